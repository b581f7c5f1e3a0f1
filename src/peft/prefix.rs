//! Prefix tuning (Li & Liang 2021): `p` trainable key/value positions prepended in every
//! attention layer, which every query attends to while the model stays frozen.
//!
//! ```text
//! P = prompt_embeddings                       [p, layers·2·kv_dim]    (kv_dim = kv_heads·head_dim)
//!   or, with prefix_projection (training only):
//! P = W₂ tanh(W₁ E + b₁) + b₂,   E: [p, hidden], W₁: [512, hidden], W₂: [layers·2·kv_dim, 512]
//! layer ℓ: P viewed as [p, layers·2, kv_heads, head_dim]; keys = slot 2ℓ, values = slot 2ℓ+1,
//!          each [kv_heads, p, head_dim], prepended to the layer's keys and values (attn.kv)
//! ```
//!
//! As PEFT: the prefix keys are not rotated by RoPE; grouped-query models use the K/V width;
//! the prefix counts as `p` positions already in the cache, so the real tokens' positions
//! start at `p` (Hugging Face computes them from the cache length); with a projection the
//! adapter file holds its output, `prompt_embeddings`, so what is saved is the plain
//! prefix. Generation with the KV cache prepends the prefix once, at the first forward.

use std::sync::Arc;

use serde_json::{json, Value};

use super::method::{AdapterFiles, Method, MethodConfig, Registration, Settings};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::nn::{BlockHook, Linear};
use crate::rng::Rng;
use crate::tensor::Tensor;

#[derive(Debug, Clone, PartialEq)]
pub struct PrefixConfig {
    /// `p`, the prefix length.
    pub num_virtual_tokens: usize,
    /// Reparameterise the prefix by an MLP during training.
    pub prefix_projection: bool,
    /// The MLP's hidden width (PEFT's `encoder_hidden_size`).
    pub encoder_hidden_size: usize,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig { num_virtual_tokens: 20, prefix_projection: false, encoder_hidden_size: 512 }
    }
}

/// Where the prefix comes from.
#[derive(Debug)]
enum Source {
    /// `prompt_embeddings` itself is trained.
    Plain(Tensor),
    /// `W₂ tanh(W₁ E + b₁) + b₂` is trained through `E`, `W₁`, `b₁`, `W₂`, `b₂`.
    Projected { embedding: Tensor, up: Linear, out: Linear },
}

/// The prefix of every layer; one hook shared by all blocks.
#[derive(Debug)]
pub struct PrefixHook {
    source: Source,
    p: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl PrefixHook {
    /// `P: [p, layers·2·kv_dim]`.
    pub fn prompt_embeddings(&self) -> Result<Tensor> {
        match &self.source {
            Source::Plain(t) => Ok(t.clone()),
            Source::Projected { embedding, up, out } => out.forward(&up.forward(embedding)?.tanh()?),
        }
    }
}

impl BlockHook for PrefixHook {
    fn attn_kv(&self, layer: usize, k: Tensor, v: Tensor, offset: usize) -> Result<(Tensor, Tensor)> {
        if offset > 0 {
            return Ok((k, v)); // already in the cache
        }
        let b = k.shape()[0];
        let (p, kh, hd) = (self.p as isize, self.kv_heads, self.head_dim);
        let table = self.prompt_embeddings()?.reshape(&[p, (2 * self.layers) as isize, kh as isize, hd as isize])?;
        let part = |slot: usize| -> Result<Tensor> {
            let x = table.narrow(1, slot, 1)?.reshape(&[p, kh as isize, hd as isize])?.transpose(0, 1)?; // [kh, p, hd]
            x.unsqueeze(0)?.broadcast_to(&[b, kh, self.p, hd])?.to_dtype(k.dtype())
        };
        let (pk, pv) = (part(2 * layer)?, part(2 * layer + 1)?);
        Ok((Tensor::concat(&[&pk, &k], 2)?, Tensor::concat(&[&pv, &v], 2)?))
    }

    fn positions_before(&self) -> usize {
        self.p
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Prefix tuning attached to a model.
#[derive(Debug)]
pub struct PrefixAdapter {
    pub config: PrefixConfig,
    pub hook: Arc<PrefixHook>,
}

/// `(layers, kv_heads, head_dim, hidden)` of `model`; an error when its blocks have different
/// key/value heads (a compressed model): PEFT's prefix layout has one width for every layer.
fn shape_of(model: &dyn CausalLm) -> Result<(usize, usize, usize, usize)> {
    let c = &model.decoder().config;
    if let Some(b) = model.decoder().blocks.iter().find(|b| b.attn.heads(c).1 != c.kv_heads) {
        return Err(Error::InvalidArgument {
            op: "prefix tuning",
            msg: format!(
                "block {} has {} key/value heads where the model has {}: prefix tuning needs the same heads in every block",
                b.index,
                b.attn.heads(c).1,
                c.kv_heads
            ),
        });
    }
    Ok((model.num_layers(), c.kv_heads, c.head_dim, model.hidden_size()))
}

impl PrefixAdapter {
    /// Attach a fresh prefix: `prompt_embeddings ~ N(0, 1)` (PEFT's `nn.Embedding` init), or
    /// with a projection `E ~ N(0, 1)` and the MLP's linears as `nn.Linear`'s default.
    pub fn attach(model: &mut dyn CausalLm, config: PrefixConfig, seed: u64) -> Result<PrefixAdapter> {
        let (layers, kv_heads, head_dim, hidden) = shape_of(model)?;
        let width = layers * 2 * kv_heads * head_dim;
        let dev = model.lm_head().weight.device().clone();
        let dt = super::trainable_dtype(model.lm_head().weight.dtype());
        let mut rng = Rng::new(super::mix(seed, 0x9AEF_1C5E));
        let p = config.num_virtual_tokens;
        let source = if config.prefix_projection {
            let h = config.encoder_hidden_size;
            let mut linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                let bound = 1.0 / (inp as f64).sqrt();
                let w = Tensor::rand_uniform(&[out, inp], -bound, bound, dt, &dev, &mut rng)?.requires_grad()?;
                let b = Tensor::rand_uniform(&[out], -bound, bound, dt, &dev, &mut rng)?.requires_grad()?;
                Ok(Linear::new(name, w, Some(b)))
            };
            let up = linear("prompt_encoder.transform.0", h, hidden)?;
            let out = linear("prompt_encoder.transform.2", width, h)?;
            let embedding = Tensor::randn(&[p, hidden], 0.0, 1.0, dt, &dev, &mut rng)?.requires_grad()?;
            Source::Projected { embedding, up, out }
        } else {
            Source::Plain(Tensor::randn(&[p, width], 0.0, 1.0, dt, &dev, &mut rng)?)
        };
        Self::install(model, config, source)
    }

    fn install(model: &mut dyn CausalLm, config: PrefixConfig, source: Source) -> Result<PrefixAdapter> {
        let (layers, kv_heads, head_dim, _) = shape_of(model)?;
        let p = config.num_virtual_tokens;
        if p == 0 {
            return Err(Error::InvalidArgument { op: "prefix tuning", msg: "num_virtual_tokens must be at least 1".into() });
        }
        if let Some(ctx) = model.max_positions().filter(|&c| p >= c) {
            return Err(Error::InvalidArgument {
                op: "prefix tuning",
                msg: format!("num_virtual_tokens = {p} leaves no room for a token in the model's context of {ctx} positions"),
            });
        }
        let source = match source {
            Source::Plain(t) => Source::Plain(t.contiguous()?.requires_grad()?),
            s => s,
        };
        let hook = Arc::new(PrefixHook { source, p, layers, kv_heads, head_dim });
        let width = layers * 2 * kv_heads * head_dim;
        let got = hook.prompt_embeddings()?.shape().to_vec();
        if got != [p, width] {
            return Err(Error::Shape {
                op: "prefix tuning",
                msg: format!(
                    "prompt_embeddings has shape {got:?}, this model needs [{p}, {width}] ({layers} layers × 2 × {kv_heads} key/value heads × {head_dim})"
                ),
            });
        }
        if model.decoder().blocks.iter().any(|b| b.hooks.iter().any(|h| h.positions_before() > 0)) {
            return Err(Error::InvalidArgument { op: "prefix tuning", msg: "the model already has a prefix attached".into() });
        }
        for blk in model.decoder_mut().blocks.iter_mut() {
            blk.hooks.push(hook.clone());
        }
        Ok(PrefixAdapter { config, hook })
    }
}

impl MethodConfig for PrefixConfig {
    fn name(&self) -> &'static str {
        "prefix"
    }

    fn attach(&self, model: &mut dyn CausalLm, seed: u64) -> Result<Box<dyn Method>> {
        Ok(Box::new(PrefixAdapter::attach(model, self.clone(), seed)?))
    }

    fn fingerprint(&self) -> Value {
        json!({ "num_virtual_tokens": self.num_virtual_tokens, "prefix_projection": self.prefix_projection,
                "encoder_hidden_size": self.encoder_hidden_size })
    }

    /// PEFT's prefix-tuning examples train with 1e-2 to 3e-2.
    fn default_lr(&self) -> f64 {
        1e-2
    }
}

impl Method for PrefixAdapter {
    fn name(&self) -> &'static str {
        "prefix"
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        match &self.hook.source {
            Source::Plain(t) => vec![("prompt_embeddings".into(), t.clone())],
            Source::Projected { embedding, up, out } => {
                let mut v = vec![("prompt_encoder.embedding.weight".to_string(), embedding.clone())];
                for l in [up, out] {
                    v.push((format!("{}.weight", l.name), l.weight.clone()));
                    v.push((format!("{}.bias", l.name), l.bias.clone().expect("the projection has biases")));
                }
                v
            }
        }
    }

    /// `prompt_embeddings` (with a projection: its output), unprefixed, as PEFT saves it.
    fn adapter_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("prompt_embeddings".into(), crate::autograd::with_no_grad(|| self.hook.prompt_embeddings())?.detach())])
    }

    fn num_sites(&self) -> usize {
        self.hook.layers
    }

    fn adapter_config(&self, _model: &mut dyn CausalLm) -> Value {
        json!({
            "peft_type": "PREFIX_TUNING",
            "num_virtual_tokens": self.config.num_virtual_tokens,
            // As PEFT writes them for a grouped-query model: the key/value width and heads.
            "token_dim": self.hook.kv_heads * self.hook.head_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": self.hook.kv_heads,
            "num_layers": self.hook.layers,
            "encoder_hidden_size": self.config.encoder_hidden_size,
            "prefix_projection": self.config.prefix_projection,
        })
    }

    fn remove(&self, model: &mut dyn CausalLm) -> Result<()> {
        for blk in model.decoder_mut().blocks.iter_mut() {
            blk.hooks.retain(|h| !super::is_same(h, &self.hook));
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub const PREFIX: Registration = Registration {
    name: "prefix",
    about: "trainable key/value prefixes in every layer (prefix tuning; --prefix-projection reparameterises them)",
    peft_type: "PREFIX_TUNING",
    settings: &["num-virtual-tokens", "prefix-projection", "encoder-hidden-size"],
    configure: |s: &Settings| {
        let d = PrefixConfig::default();
        let config = PrefixConfig {
            num_virtual_tokens: s.usize("num-virtual-tokens")?.unwrap_or(d.num_virtual_tokens),
            prefix_projection: s.bool("prefix-projection")?.unwrap_or(d.prefix_projection),
            encoder_hidden_size: s.usize("encoder-hidden-size")?.unwrap_or(d.encoder_hidden_size),
        };
        if config.num_virtual_tokens == 0 || config.encoder_hidden_size == 0 {
            return Err(Error::InvalidArgument {
                op: "prefix tuning",
                msg: "--num-virtual-tokens and --encoder-hidden-size must be at least 1".into(),
            });
        }
        Ok(Arc::new(config))
    },
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("PREFIX_TUNING"),
    load,
};

/// Attach a saved PEFT `PREFIX_TUNING` adapter: `prompt_embeddings [p, layers·2·kv_dim]`.
fn load(model: &mut dyn CausalLm, files: &mut AdapterFiles, device: &Device) -> Result<Box<dyn Method>> {
    files.check_keys(
        &[
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "encoder_hidden_size",
            "prefix_projection",
        ],
        &["init_weights"],
    );
    let (layers, kv_heads, head_dim, _) = shape_of(model)?;
    for (field, want) in [("num_layers", layers), ("token_dim", kv_heads * head_dim)] {
        if let Some(got) = files.usize(field)? {
            if got != want {
                return Err(files
                    .config_error(format!("field '{field}' = {got}, but the model has {want}: the adapter was made for another model")));
            }
        }
    }
    if files.usize("num_transformer_submodules")?.is_some_and(|n| n != 1) {
        return Err(files.config_error("field 'num_transformer_submodules' must be 1 (decoder-only models)"));
    }
    if let Some(k) = files.keys.iter().find(|k| *k != "prompt_embeddings") {
        return Err(files.weights_error(format!("tensor '{k}' is not part of a prefix-tuning adapter (prompt_embeddings)")));
    }
    let table = files.tensor("prompt_embeddings", device)?;
    let p = files.usize("num_virtual_tokens")?.unwrap_or(table.shape().first().copied().unwrap_or(0));
    let config = PrefixConfig {
        num_virtual_tokens: p,
        // What was saved is the plain prefix, whatever trained it.
        prefix_projection: false,
        encoder_hidden_size: files.usize("encoder_hidden_size")?.unwrap_or(512),
    };
    let table = table.to_dtype(super::trainable_dtype(model.lm_head().weight.dtype()))?;
    let adapter = PrefixAdapter::install(model, config, Source::Plain(table)).map_err(|e| files.weights_error(e.to_string()))?;
    Ok(Box::new(adapter))
}
