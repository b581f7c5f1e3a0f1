//! The LLaMA family (LLaMA 2/3, TinyLlama, SmolLM, Qwen2-style configs): pre-norm blocks of
//! RMSNorm → grouped-query attention with rotary positions → residual, RMSNorm → SwiGLU MLP →
//! residual; a final RMSNorm and the LM head (tied to the embedding or not).
//!
//! ```text
//! h₀ = E[ids]
//! a  = h + Attn(RMSNorm(h))      Attn: q,k,v = x W_qᵀ, x W_kᵀ, x W_vᵀ; rotate q,k by position;
//!                                        softmax(q kᵀ/√d + causal) v, heads merged, · W_oᵀ
//! h' = a + W_down (silu(W_gate x) ⊙ W_up x),  x = RMSNorm(a)
//! logits = RMSNorm(h_L) W_lmᵀ
//! ```

use super::CausalLm;
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::io::config::RawConfig;
use crate::io::gguf::GgufFile;
use crate::io::Weights;
use crate::nn::{Activation, BlockConfig, Decoder, DecoderBlock, Embedding, Linear, Mlp, Norm, Qkv, Rope, SelfAttention, COMPUTE};
use crate::tensor::{RopeLayout, Tensor};

/// The config fields the math depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Mistral-style sliding-window attention span, when the config enables it. Within the
    /// window it equals full attention; longer sequences are refused (not implemented).
    pub sliding_window: Option<usize>,
    /// `max_position_embeddings` (GGUF: `llama.context_length`), when given.
    pub max_position_embeddings: Option<usize>,
    /// Per-block MLP widths, when they differ (tinytune's `intermediate_sizes` key: a model
    /// compressed by FineGates); `None`: every block is `intermediate_size` wide.
    pub intermediate_sizes: Option<Vec<usize>>,
    /// Per-block `(query heads, key/value heads)`, when they differ (tinytune's
    /// `attention_heads` key, `[[heads, kv_heads], …]`: a model whose dead attention heads
    /// FineGates' compression removed); `None`: every block has the model's heads.
    pub attention_heads: Option<Vec<(usize, usize)>>,
}

impl LlamaConfig {
    /// Refuse sizes no real model has before anything is allocated from them (a corrupt or
    /// hostile config must give an error, not an allocation failure or an overflow).
    fn checked(self) -> std::result::Result<LlamaConfig, String> {
        const MAX_DIM: usize = 1 << 24;
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("head_dim", self.head_dim),
            ("num_attention_heads × head_dim", self.num_attention_heads.saturating_mul(self.head_dim)),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_DIM {
                return Err(format!("{name} = {v} is outside 1..={MAX_DIM}"));
            }
        }
        if self.num_hidden_layers > 1 << 12 {
            return Err(format!("num_hidden_layers = {} is implausibly large", self.num_hidden_layers));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(format!("rms_norm_eps = {} must be a small positive number (real models use 1e-6 to 1e-5)", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!("rope_theta = {} must be a positive number above 1 (real models use 10000 to 10^6)", self.rope_theta));
        }
        if let Some(n) = self.max_position_embeddings.filter(|&n| n == 0 || n > super::MAX_CONTEXT) {
            return Err(format!("max_position_embeddings = {n} is outside 1..={} (no real model has such a context)", super::MAX_CONTEXT));
        }
        if let Some(sizes) = &self.intermediate_sizes {
            if sizes.len() != self.num_hidden_layers {
                return Err(format!("intermediate_sizes lists {} widths for {} layers", sizes.len(), self.num_hidden_layers));
            }
            if let Some(w) = sizes.iter().find(|&&w| w == 0 || w > MAX_DIM) {
                return Err(format!("intermediate_sizes holds {w}, outside 1..={MAX_DIM}"));
            }
        }
        if let Some(heads) = &self.attention_heads {
            if heads.len() != self.num_hidden_layers {
                return Err(format!("attention_heads lists {} pairs for {} layers", heads.len(), self.num_hidden_layers));
            }
            if let Some((i, (h, kv))) =
                heads.iter().enumerate().find(|(_, &(h, kv))| h == 0 || kv == 0 || h % kv != 0 || h > self.num_attention_heads)
            {
                return Err(format!(
                    "attention_heads[{i}] = [{h}, {kv}]: the heads must be a positive multiple of the key/value heads and at most num_attention_heads {}",
                    self.num_attention_heads
                ));
            }
        }
        Ok(self)
    }

    /// `(query heads, key/value heads)` of block `i`.
    pub fn heads_of(&self, i: usize) -> (usize, usize) {
        self.attention_heads.as_ref().and_then(|h| h.get(i).copied()).unwrap_or((self.num_attention_heads, self.num_key_value_heads))
    }

    /// The MLP width of block `i`.
    pub fn intermediate_size_of(&self, i: usize) -> usize {
        self.intermediate_sizes.as_ref().and_then(|s| s.get(i).copied()).unwrap_or(self.intermediate_size)
    }

    pub fn from_raw(raw: &RawConfig) -> Result<LlamaConfig> {
        let hidden_size = raw.usize("hidden_size")?;
        let heads = raw.usize("num_attention_heads")?;
        let kv = raw.opt_usize("num_key_value_heads")?.unwrap_or(heads);
        if heads == 0 || kv == 0 || heads % kv != 0 {
            return Err(raw.error(format!("num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}")));
        }
        let head_dim = match raw.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => return Err(raw.error(format!("hidden_size {hidden_size} is not divisible by num_attention_heads {heads}"))),
        };
        // transformers ≥ 4.5x moves rope_theta into `rope_parameters`.
        let rope_theta = match raw.get("rope_parameters").and_then(|p| p.get("rope_theta")).filter(|v| !v.is_null()) {
            Some(t) => t.as_f64().ok_or_else(|| raw.error(format!("field 'rope_parameters.rope_theta' must be a number, got {t}")))?,
            None => raw.f64_or("rope_theta", 10000.0)?,
        };
        let act = raw.str_or("hidden_act", "silu")?;
        if act != "silu" {
            return Err(raw.error(format!("field 'hidden_act' = '{act}' is not supported (SwiGLU with silu only)")));
        }
        raw.reject_unless("rope_scaling", |_| false, "RoPE scaling variants are not implemented")?;
        let plain_rope = |p: &serde_json::Value| p.get("rope_type").and_then(|t| t.as_str()).is_none_or(|t| t == "default");
        raw.reject_unless("rope_parameters", plain_rope, "only the default RoPE type is implemented")?;
        // Qwen2 carries a window but disables it with use_sliding_window = false; Mistral v0.1
        // enables it by giving a window at all.
        let sliding_window = if raw.bool_or("use_sliding_window", true)? { raw.opt_usize("sliding_window")? } else { None };
        let model_type = raw.model_type()?;
        let qwen = model_type.starts_with("qwen2") || model_type.starts_with("Qwen2");
        LlamaConfig {
            vocab_size: raw.usize("vocab_size")?,
            hidden_size,
            intermediate_size: raw.usize("intermediate_size")?,
            num_hidden_layers: raw.usize("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: raw.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            tie_word_embeddings: raw.bool_or("tie_word_embeddings", false)?,
            // Qwen2 has q/k/v biases without saying so in its config.
            attention_bias: raw.bool_or("attention_bias", qwen)?,
            mlp_bias: raw.bool_or("mlp_bias", false)?,
            sliding_window,
            max_position_embeddings: raw.opt_usize("max_position_embeddings")?,
            intermediate_sizes: match raw.get("intermediate_sizes") {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(
                    v.as_array()
                        .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| raw.error(format!("field 'intermediate_sizes' must list one width per layer, got {v}")))?,
                ),
            },
            attention_heads: match raw.get("attention_heads") {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(
                    v.as_array()
                        .and_then(|a| {
                            a.iter()
                                .map(|p| match p.as_array().map(Vec::as_slice) {
                                    Some([h, kv]) => Some((h.as_u64()? as usize, kv.as_u64()? as usize)),
                                    _ => None,
                                })
                                .collect::<Option<Vec<_>>>()
                        })
                        .ok_or_else(|| {
                            raw.error(format!("field 'attention_heads' must list one [heads, kv_heads] pair per layer, got {v}"))
                        })?,
                ),
            },
        }
        .checked()
        .map_err(|m| raw.error(m))
    }

    /// The config of a GGUF file with `general.architecture = "llama"`, from its `llama.*`
    /// metadata. The vocabulary size is `llama.vocab_size`, else the length of
    /// `tokenizer.ggml.tokens`, else the rows of `token_embd.weight`; the embeddings are tied
    /// when the file has no `output.weight`.
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
        let arch = file.architecture()?;
        if arch != "llama" {
            return Err(file.error(format!("general.architecture is '{arch}', not 'llama'")));
        }
        let hidden_size = file.usize("llama.embedding_length")?;
        let heads = file.usize("llama.attention.head_count")?;
        let kv = file.opt_usize("llama.attention.head_count_kv")?.unwrap_or(heads);
        if heads == 0 || kv == 0 || heads % kv != 0 {
            return Err(
                file.error(format!("llama.attention.head_count {heads} must be a positive multiple of llama.attention.head_count_kv {kv}"))
            );
        }
        let head_dim = match file.opt_usize("llama.attention.key_length")? {
            Some(d) => d,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => {
                return Err(
                    file.error(format!("llama.embedding_length {hidden_size} is not divisible by llama.attention.head_count {heads}"))
                )
            }
        };
        if let Some(v) = file.opt_usize("llama.attention.value_length")? {
            if v != head_dim {
                return Err(file.error(format!("llama.attention.value_length {v} differs from the key length {head_dim}: not supported")));
            }
        }
        if let Some(r) = file.opt_usize("llama.rope.dimension_count")? {
            if r != head_dim {
                return Err(file.error(format!("llama.rope.dimension_count {r} != head dim {head_dim}: partial rotary is not supported")));
            }
        }
        if let Some(s) = file.opt_str("llama.rope.scaling.type")? {
            if s != "none" {
                return Err(file.error(format!("llama.rope.scaling.type = '{s}' is not supported (RoPE scaling is not implemented)")));
            }
        }
        if file.opt_usize("llama.expert_count")?.unwrap_or(0) > 0 {
            return Err(file.error("llama.expert_count > 0: mixture-of-experts models are not supported"));
        }
        let vocab_size = match file.opt_usize("llama.vocab_size")? {
            Some(v) => v,
            None => match file.get("tokenizer.ggml.tokens").and_then(|t| t.as_array()) {
                Some(t) => t.len(),
                None => file
                    .tensor_info("token_embd.weight")
                    .and_then(|t| t.ne.get(1).map(|&v| v as usize))
                    .ok_or_else(|| file.error("cannot tell the vocabulary size: no llama.vocab_size, tokens or token_embd.weight"))?,
            },
        };
        LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: file.usize("llama.feed_forward_length")?,
            num_hidden_layers: file.usize("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: file
                .opt_f64("llama.attention.layer_norm_rms_epsilon")?
                .ok_or_else(|| file.error("missing metadata 'llama.attention.layer_norm_rms_epsilon'"))?,
            rope_theta: file.opt_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
            tie_word_embeddings: !file.contains("output.weight"),
            attention_bias: file.contains("blk.0.attn_q.bias"),
            mlp_bias: file.contains("blk.0.ffn_up.bias"),
            sliding_window: None,
            max_position_embeddings: file.opt_usize("llama.context_length")?,
            intermediate_sizes: None,
            attention_heads: None,
        }
        .checked()
        .map_err(|m| file.error(m))
    }
}

/// A LLaMA-family causal language model.
pub struct Llama {
    pub config: LlamaConfig,
    embed: Embedding,
    decoder: Decoder,
    lm_head: Linear,
}

/// `{name}.weight` `[out, inp]` as stored, and `{name}.bias` when `bias`.
pub(super) fn linear(w: &dyn Weights, name: &str, out: usize, inp: usize, bias: bool, dev: &Device) -> Result<Linear> {
    let weight = w.get_stored(&format!("{name}.weight"), &[out, inp], dev)?;
    let bias = if bias { Some(w.get(&format!("{name}.bias"), &[out], COMPUTE, dev)?) } else { None };
    Ok(Linear::new(name, weight, bias))
}

fn rms(w: &dyn Weights, name: &str, d: usize, eps: f64, dev: &Device) -> Result<Norm> {
    rms_norm(w, name, d, eps, false, dev)
}

/// An RMSNorm of width `d` with the checkpoint's `{name}.weight` (applied as `1 + w` with
/// `unit_offset`, Gemma's).
pub(super) fn rms_norm(w: &dyn Weights, name: &str, d: usize, eps: f64, unit_offset: bool, dev: &Device) -> Result<Norm> {
    Ok(Norm::Rms { name: name.to_string(), weight: w.get(&format!("{name}.weight"), &[d], COMPUTE, dev)?, eps, unit_offset })
}

impl LlamaConfig {
    /// The shared block's configuration: grouped-query attention with half-split RoPE, SwiGLU.
    pub fn block_config(&self) -> BlockConfig {
        BlockConfig {
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            rope: Some(Rope::plain(self.rope_theta, RopeLayout::HalfSplit)),
            act: Activation::Silu,
            // Refused beyond the window instead (see `embed`); the mask supports windows.
            window: None,
            local: None,
            attn_scale: None,
        }
    }
}

impl Llama {
    pub fn load(config: LlamaConfig, w: &dyn Weights, dev: &Device) -> Result<Llama> {
        let c = &config;
        let (d, bc) = (c.hidden_size, c.block_config());
        let embed =
            Embedding { name: "model.embed_tokens".into(), weight: w.get_stored("model.embed_tokens.weight", &[c.vocab_size, d], dev)? };
        let mut blocks = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let lin = |name: &str, out: usize, inp: usize, bias: bool| linear(w, &format!("{p}.{name}"), out, inp, bias, dev);
            let (heads, kv_heads) = c.heads_of(i);
            let (q_dim, kv_dim) = (heads * bc.head_dim, kv_heads * bc.head_dim);
            blocks.push(DecoderBlock {
                name: p.clone(),
                index: i,
                attn_norm: rms(w, &format!("{p}.input_layernorm"), d, c.rms_norm_eps, dev)?,
                attn: SelfAttention {
                    name: format!("{p}.self_attn"),
                    qkv: Qkv::Separate {
                        q: lin("self_attn.q_proj", q_dim, d, c.attention_bias)?,
                        k: lin("self_attn.k_proj", kv_dim, d, c.attention_bias)?,
                        v: lin("self_attn.v_proj", kv_dim, d, c.attention_bias)?,
                    },
                    o: lin("self_attn.o_proj", d, q_dim, false)?,
                    q_norm: None,
                    k_norm: None,
                },
                post_attn_norm: None,
                mlp_norm: rms(w, &format!("{p}.post_attention_layernorm"), d, c.rms_norm_eps, dev)?,
                mlp: Mlp {
                    name: format!("{p}.mlp"),
                    gate: Some(lin("mlp.gate_proj", c.intermediate_size_of(i), d, c.mlp_bias)?),
                    up: lin("mlp.up_proj", c.intermediate_size_of(i), d, c.mlp_bias)?,
                    down: lin("mlp.down_proj", d, c.intermediate_size_of(i), c.mlp_bias)?,
                },
                post_mlp_norm: None,
                local: false,
                hooks: Vec::new(),
            });
        }
        let norm = rms(w, "model.norm", d, c.rms_norm_eps, dev)?;
        let lm_head = if c.tie_word_embeddings || !w.contains("lm_head.weight") {
            Linear::new("lm_head", embed.weight.clone(), None)
        } else {
            linear(w, "lm_head", c.vocab_size, d, false, dev)?
        };
        Ok(Llama { decoder: Decoder { config: bc, blocks, norm, checkpointing: false, inputs: Vec::new() }, config, embed, lm_head })
    }
}

impl CausalLm for Llama {
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.forward(ids)
    }

    /// No learned positions (RoPE rotates inside the blocks); longer than a sliding window is
    /// refused.
    fn embed_positions(&self, h: Tensor, start: usize) -> Result<Tensor> {
        let t = h.shape()[1];
        if let Some(w) = self.config.sliding_window.filter(|&w| start + t > w) {
            return Err(Error::Shape {
                op: "llama.forward",
                msg: format!("{} positions exceed the sliding window of {w}; sliding-window attention is not implemented", start + t),
            });
        }
        Ok(h)
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
        let mut out = self.decoder.linears_mut();
        out.push(&mut self.lm_head);
        out
    }

    fn visit_parameters(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        super::visit_embed_decoder_head(&mut self.embed, &mut self.decoder, &mut self.lm_head, f)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn max_positions(&self) -> Option<usize> {
        self.config.max_position_embeddings
    }

    fn architecture(&self) -> &'static str {
        "llama"
    }

    fn config_json(&self) -> serde_json::Value {
        let c = &self.config;
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "tie_word_embeddings": self.lm_head.weight.id() == self.embed.weight.id(),
            "attention_bias": c.attention_bias,
            "mlp_bias": c.mlp_bias,
            "torch_dtype": "float32",
        });
        if let Some(m) = c.max_position_embeddings {
            v["max_position_embeddings"] = m.into();
        }
        if let Some(w) = c.sliding_window {
            v["sliding_window"] = w.into();
        }
        // The widths as the blocks hold them (a compressed model's differ per block).
        let widths: Vec<usize> = self.decoder.blocks.iter().map(|b| b.mlp.down.in_features()).collect();
        if widths.iter().any(|&w| w != c.intermediate_size) {
            v["intermediate_size"] = widths.iter().copied().max().unwrap_or(c.intermediate_size).into();
            v["intermediate_sizes"] = widths.into();
        }
        let heads: Vec<(usize, usize)> = self.decoder.blocks.iter().map(|b| b.attn.heads(&self.decoder.config)).collect();
        if heads.iter().any(|&h| h != (c.num_attention_heads, c.num_key_value_heads)) {
            v["attention_heads"] = heads.iter().map(|&(h, kv)| serde_json::json!([h, kv])).collect::<Vec<_>>().into();
        }
        v
    }
}
