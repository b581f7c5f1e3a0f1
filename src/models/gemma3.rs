//! Gemma 3 (text): the shared decoder block with Gemma's choices, as `transformers`'
//! `Gemma3ForCausalLM` computes it.
//!
//! ```text
//! h₀ = E[ids] · √hidden                                  (the scale rounded to f32)
//! block (every norm is RMSNorm with weight 1 + w):
//!   x = norm_in(h);  q,k,v = x W_qᵀ, x W_kᵀ, x W_vᵀ
//!   q,k = norm_q(q), norm_k(k)                           per head, over head_dim (QK-norm)
//!   q,k rotated (half-split RoPE): base 10⁶ on global layers, 10⁴ on local ones
//!   a = softmax(q kᵀ · query_pre_attn_scalar^-½ + mask) v · W_oᵀ
//!       mask: causal; local layers also see only the last `sliding_window` keys
//!   h = h + norm_post_attn(a)
//!   h = h + norm_post_mlp(W_down (gelu_tanh(W_gate x) ⊙ W_up x)),  x = norm_pre_mlp(h)
//! logits = norm(h_L) Eᵀ                                  (tied head)
//! ```
//!
//! Every sixth layer is global by default (`layer_types` in the config says otherwise);
//! grouped-query attention with 256-wide heads. Loaded from a Hugging Face directory
//! (`model_type = "gemma3_text"`) or a GGUF file (`general.architecture = "gemma3"`, whose norm
//! weights llama.cpp stored as `1 + w`).

use super::llama::linear;
use super::CausalLm;
use crate::backend::Device;
use crate::error::Result;
use crate::io::config::RawConfig;
use crate::io::gguf::GgufFile;
use crate::io::Weights;
use crate::nn::{Activation, BlockConfig, Decoder, DecoderBlock, Embedding, Linear, LocalAttention, Mlp, Norm, Qkv, Rope, SelfAttention};
use crate::tensor::{RopeLayout, Tensor};

/// The config fields the math depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RoPE base of the global layers, and its linear scaling factor (1: none).
    pub rope_theta: f64,
    pub rope_linear_factor: f64,
    /// RoPE base of the local (sliding-window) layers.
    pub rope_local_theta: f64,
    pub sliding_window: usize,
    /// One per layer: attends within the sliding window (`"sliding_attention"`).
    pub local_layers: Vec<bool>,
    pub query_pre_attn_scalar: f64,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: Option<usize>,
}

/// Every `pattern`-th layer global, the others local (`sliding_window_pattern`, 6 in Gemma 3).
fn local_pattern(layers: usize, pattern: usize) -> Vec<bool> {
    (0..layers).map(|i| (i + 1) % pattern.max(1) != 0).collect()
}

impl Gemma3Config {
    fn checked(self) -> std::result::Result<Gemma3Config, String> {
        const MAX_DIM: usize = 1 << 24;
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("head_dim", self.head_dim),
            ("num_attention_heads × head_dim", self.num_attention_heads.saturating_mul(self.head_dim)),
            ("sliding_window", self.sliding_window),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_DIM {
                return Err(format!("{name} = {v} is outside 1..={MAX_DIM}"));
            }
        }
        if self.num_hidden_layers > 1 << 12 {
            return Err(format!("num_hidden_layers = {} is implausibly large", self.num_hidden_layers));
        }
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if h == 0 || kv == 0 || h % kv != 0 {
            return Err(format!("num_attention_heads {h} must be a positive multiple of num_key_value_heads {kv}"));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!("head_dim = {} must be even (RoPE rotates pairs)", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(format!("rms_norm_eps = {} must be a small positive number", self.rms_norm_eps));
        }
        for (name, t) in [("rope_theta", self.rope_theta), ("the local RoPE base", self.rope_local_theta)] {
            if !(t.is_finite() && t > 1.0) {
                return Err(format!("{name} = {t} must be a number above 1"));
            }
        }
        if !(self.rope_linear_factor.is_finite() && self.rope_linear_factor > 0.0) {
            return Err(format!("the RoPE scaling factor {} must be positive", self.rope_linear_factor));
        }
        if !(self.query_pre_attn_scalar.is_finite() && self.query_pre_attn_scalar > 0.0) {
            return Err(format!("query_pre_attn_scalar = {} must be positive", self.query_pre_attn_scalar));
        }
        if self.local_layers.len() != self.num_hidden_layers {
            return Err(format!("layer_types lists {} layers, num_hidden_layers is {}", self.local_layers.len(), self.num_hidden_layers));
        }
        if let Some(n) = self.max_position_embeddings.filter(|&n| n == 0 || n > super::MAX_CONTEXT) {
            return Err(format!("max_position_embeddings = {n} is outside 1..={}", super::MAX_CONTEXT));
        }
        Ok(self)
    }

    /// From a Hugging Face `config.json` with `model_type = "gemma3_text"`. Defaults are
    /// `Gemma3TextConfig`'s. Keys that change the math in ways not implemented (logit
    /// soft-capping, bidirectional attention, RoPE types other than default and linear) are
    /// errors naming the key.
    pub fn from_raw(raw: &RawConfig) -> Result<Gemma3Config> {
        let act = match raw.get("hidden_activation") {
            Some(_) => raw.str_or("hidden_activation", "gelu_pytorch_tanh")?,
            None => raw.str_or("hidden_act", "gelu_pytorch_tanh")?,
        };
        if act != "gelu_pytorch_tanh" && act != "gelu_new" {
            return Err(raw.error(format!("field 'hidden_activation' = '{act}' is not supported (GeGLU with gelu_pytorch_tanh only)")));
        }
        raw.reject_unless("final_logit_softcapping", |_| false, "logit soft-capping is not implemented (Gemma 3 has none)")?;
        raw.reject_unless("attn_logit_softcapping", |_| false, "attention soft-capping is not implemented (Gemma 3 has none)")?;
        raw.reject_unless("use_bidirectional_attention", |v| v == &serde_json::Value::Bool(false), "only causal attention is implemented")?;
        let layers = raw.usize("num_hidden_layers")?;
        let local_layers = match raw.get("layer_types") {
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|t| match t.as_str() {
                            Some("sliding_attention") => Some(true),
                            Some("full_attention") => Some(false),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| {
                    raw.error(format!("field 'layer_types' must list \"sliding_attention\" or \"full_attention\" per layer, got {v}"))
                })?,
            None => local_pattern(layers, raw.opt_usize("sliding_window_pattern")?.unwrap_or(6)),
        };
        // RoPE: transformers ≥ 5 writes `rope_parameters: {full_attention: {..}, sliding_attention: {..}}`;
        // earlier configs `rope_theta`, `rope_local_base_freq` and `rope_scaling` (global layers only).
        let params = raw.get("rope_parameters");
        let part = |kind: &str| params.and_then(|p| p.get(kind)).filter(|v| !v.is_null());
        let theta_of = |p: Option<&serde_json::Value>, key: &str, default: f64| -> Result<f64> {
            match p.and_then(|p| p.get("rope_theta")).filter(|v| !v.is_null()) {
                Some(t) => t.as_f64().ok_or_else(|| raw.error(format!("field 'rope_parameters.*.rope_theta' must be a number, got {t}"))),
                None => raw.f64_or(key, default),
            }
        };
        let factor_of = |p: Option<&serde_json::Value>, what: &str| -> Result<f64> {
            let Some(p) = p else { return Ok(1.0) };
            match p.get("rope_type").and_then(|t| t.as_str()).unwrap_or("default") {
                "default" => Ok(1.0),
                "linear" => p
                    .get("factor")
                    .and_then(|f| f.as_f64())
                    .ok_or_else(|| raw.error(format!("field '{what}' has rope_type 'linear' without a numeric 'factor'"))),
                other => Err(raw.error(format!("field '{what}' has rope_type '{other}': only 'default' and 'linear' are implemented"))),
            }
        };
        let global = part("full_attention").or_else(|| raw.get("rope_scaling"));
        let rope_linear_factor = factor_of(global, "rope_parameters.full_attention")?;
        if factor_of(part("sliding_attention"), "rope_parameters.sliding_attention")? != 1.0 {
            return Err(raw.error("field 'rope_parameters.sliding_attention' scales RoPE: not implemented for local layers"));
        }
        let heads = raw.opt_usize("num_attention_heads")?.unwrap_or(8);
        Gemma3Config {
            vocab_size: raw.usize("vocab_size")?,
            hidden_size: raw.usize("hidden_size")?,
            intermediate_size: raw.usize("intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim: raw.opt_usize("head_dim")?.unwrap_or(256),
            rms_norm_eps: raw.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: theta_of(part("full_attention"), "rope_theta", 1_000_000.0)?,
            rope_linear_factor,
            rope_local_theta: theta_of(part("sliding_attention"), "rope_local_base_freq", 10_000.0)?,
            sliding_window: raw.opt_usize("sliding_window")?.unwrap_or(4096),
            local_layers,
            query_pre_attn_scalar: raw.f64_or("query_pre_attn_scalar", 256.0)?,
            attention_bias: raw.bool_or("attention_bias", false)?,
            tie_word_embeddings: raw.bool_or("tie_word_embeddings", true)?,
            max_position_embeddings: raw.opt_usize("max_position_embeddings")?,
        }
        .checked()
        .map_err(|m| raw.error(m))
    }

    /// From a GGUF file's `gemma3.*` metadata. What llama.cpp does not store it fixes for the
    /// architecture, and so does this: local layers use RoPE base 10⁴, every sixth layer is
    /// global (unless `gemma3.attention.sliding_window_pattern` says otherwise), and
    /// `query_pre_attn_scalar` is the head width (hidden / heads for the 62-layer 27B).
    pub fn from_gguf(file: &GgufFile) -> Result<Gemma3Config> {
        let arch = file.architecture()?;
        if arch != "gemma3" {
            return Err(file.error(format!("general.architecture is '{arch}', not 'gemma3'")));
        }
        let key = |k: &str| format!("gemma3.{k}");
        let heads = file.usize(&key("attention.head_count"))?;
        let head_dim = file.usize(&key("attention.key_length"))?;
        if let Some(v) = file.opt_usize(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(file.error(format!("gemma3.attention.value_length {v} differs from the key length {head_dim}: not supported")));
            }
        }
        let rope_linear_factor = match file.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => 1.0,
            Some("linear") => file.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            Some(s) => return Err(file.error(format!("gemma3.rope.scaling.type = '{s}' is not supported (none or linear)"))),
        };
        let layers = file.usize(&key("block_count"))?;
        let vocab_size = match file.get("tokenizer.ggml.tokens").and_then(|t| t.as_array()) {
            Some(t) => t.len(),
            None => file
                .tensor_info("token_embd.weight")
                .and_then(|t| t.ne.get(1).map(|&v| v as usize))
                .ok_or_else(|| file.error("cannot tell the vocabulary size: no tokenizer.ggml.tokens or token_embd.weight"))?,
        };
        Gemma3Config {
            vocab_size,
            hidden_size: file.usize(&key("embedding_length"))?,
            intermediate_size: file.usize(&key("feed_forward_length"))?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: file.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(heads),
            head_dim,
            rms_norm_eps: file.opt_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            rope_theta: file.opt_f64(&key("rope.freq_base"))?.unwrap_or(1_000_000.0),
            rope_linear_factor,
            rope_local_theta: 10_000.0,
            sliding_window: file.usize(&key("attention.sliding_window"))?,
            local_layers: local_pattern(layers, file.opt_usize(&key("attention.sliding_window_pattern"))?.unwrap_or(6)),
            // llama.cpp's rule: the 27B (62 layers) scales by hidden / heads (5376 / 32 = 168),
            // the other sizes by the head width.
            query_pre_attn_scalar: if layers == 62 {
                (file.usize(&key("embedding_length"))? / heads.max(1)) as f64
            } else {
                head_dim as f64
            },
            attention_bias: file.contains("blk.0.attn_q.bias"),
            tie_word_embeddings: !file.contains("output.weight"),
            max_position_embeddings: file.opt_usize(&key("context_length"))?,
        }
        .checked()
        .map_err(|m| file.error(m))
    }

    /// The shared block's configuration: global layers with the global RoPE, local layers
    /// with their window and base, GeGLU, the query scale.
    pub fn block_config(&self) -> BlockConfig {
        let rope = Rope { theta: self.rope_theta, layout: RopeLayout::HalfSplit, linear_factor: self.rope_linear_factor };
        BlockConfig {
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            rope: Some(rope),
            act: Activation::GeluTanh,
            window: None,
            local: Some(LocalAttention { window: self.sliding_window, rope: Rope::plain(self.rope_local_theta, RopeLayout::HalfSplit) }),
            attn_scale: Some(self.query_pre_attn_scalar.powf(-0.5)),
        }
    }
}

/// A Gemma 3 causal language model (text).
pub struct Gemma3 {
    pub config: Gemma3Config,
    embed: Embedding,
    /// `√hidden` rounded to f32, as `Gemma3TextScaledWordEmbedding` multiplies.
    embed_scale: f64,
    decoder: Decoder,
    lm_head: Linear,
}

/// Gemma's RMSNorm: the checkpoint's `w`, applied as `1 + w`.
fn norm(w: &dyn Weights, name: &str, d: usize, eps: f64, dev: &Device) -> Result<Norm> {
    super::llama::rms_norm(w, name, d, eps, true, dev)
}

impl Gemma3 {
    pub fn load(config: Gemma3Config, w: &dyn Weights, dev: &Device) -> Result<Gemma3> {
        let c = &config;
        let (d, bc, eps) = (c.hidden_size, c.block_config(), c.rms_norm_eps);
        let embed =
            Embedding { name: "model.embed_tokens".into(), weight: w.get_stored("model.embed_tokens.weight", &[c.vocab_size, d], dev)? };
        let (q_dim, kv_dim) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let mut blocks = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let lin = |name: &str, out: usize, inp: usize, bias: bool| linear(w, &format!("{p}.{name}"), out, inp, bias, dev);
            let nrm = |name: &str, width: usize| norm(w, &format!("{p}.{name}"), width, eps, dev);
            blocks.push(DecoderBlock {
                name: p.clone(),
                index: i,
                attn_norm: nrm("input_layernorm", d)?,
                attn: SelfAttention {
                    name: format!("{p}.self_attn"),
                    qkv: Qkv::Separate {
                        q: lin("self_attn.q_proj", q_dim, d, c.attention_bias)?,
                        k: lin("self_attn.k_proj", kv_dim, d, c.attention_bias)?,
                        v: lin("self_attn.v_proj", kv_dim, d, c.attention_bias)?,
                    },
                    o: lin("self_attn.o_proj", d, q_dim, c.attention_bias)?,
                    q_norm: Some(nrm("self_attn.q_norm", c.head_dim)?),
                    k_norm: Some(nrm("self_attn.k_norm", c.head_dim)?),
                },
                post_attn_norm: Some(nrm("post_attention_layernorm", d)?),
                mlp_norm: nrm("pre_feedforward_layernorm", d)?,
                mlp: Mlp {
                    name: format!("{p}.mlp"),
                    gate: Some(lin("mlp.gate_proj", c.intermediate_size, d, false)?),
                    up: lin("mlp.up_proj", c.intermediate_size, d, false)?,
                    down: lin("mlp.down_proj", d, c.intermediate_size, false)?,
                },
                post_mlp_norm: Some(nrm("post_feedforward_layernorm", d)?),
                local: c.local_layers[i],
                hooks: Vec::new(),
            });
        }
        let final_norm = norm(w, "model.norm", d, eps, dev)?;
        let lm_head = if c.tie_word_embeddings || !w.contains("lm_head.weight") {
            Linear::new("lm_head", embed.weight.clone(), None)
        } else {
            linear(w, "lm_head", c.vocab_size, d, false, dev)?
        };
        let embed_scale = (d as f64).sqrt() as f32 as f64;
        Ok(Gemma3 {
            decoder: Decoder { config: bc, blocks, norm: final_norm, checkpointing: false, inputs: Vec::new() },
            config,
            embed,
            embed_scale,
            lm_head,
        })
    }
}

impl CausalLm for Gemma3 {
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.forward(ids)?.mul_scalar(self.embed_scale)
    }

    /// No learned positions: RoPE rotates inside the blocks.
    fn embed_positions(&self, h: Tensor, _start: usize) -> Result<Tensor> {
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
        "gemma3"
    }

    fn config_json(&self) -> serde_json::Value {
        let c = &self.config;
        let global = if c.rope_linear_factor == 1.0 {
            serde_json::json!({"rope_type": "default", "rope_theta": c.rope_theta})
        } else {
            serde_json::json!({"rope_type": "linear", "factor": c.rope_linear_factor, "rope_theta": c.rope_theta})
        };
        let mut v = serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": c.rms_norm_eps,
            "rope_parameters": {
                "full_attention": global,
                "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta},
            },
            "sliding_window": c.sliding_window,
            "layer_types": c.local_layers.iter().map(|&l| if l { "sliding_attention" } else { "full_attention" }).collect::<Vec<_>>(),
            // An integer in transformers' config class.
            "query_pre_attn_scalar": if c.query_pre_attn_scalar.fract() == 0.0 {
                serde_json::json!(c.query_pre_attn_scalar as u64)
            } else {
                serde_json::json!(c.query_pre_attn_scalar)
            },
            "attention_bias": c.attention_bias,
            "tie_word_embeddings": self.lm_head.weight.id() == self.embed.weight.id(),
            "torch_dtype": "float32",
        });
        if let Some(m) = c.max_position_embeddings {
            v["max_position_embeddings"] = m.into();
        }
        v
    }
}
