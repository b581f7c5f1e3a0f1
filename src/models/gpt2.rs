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

use super::{CausalLm, KvCache};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::io::config::RawConfig;
use crate::io::Weights;
use crate::nn::{attention, attention_bias, Embedding, Linear, Norm, COMPUTE};
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
        Ok(Gpt2Config {
            vocab_size: raw.usize("vocab_size")?,
            n_positions: raw.usize("n_positions")?,
            n_embd,
            n_layer: raw.usize("n_layer")?,
            n_head,
            n_inner: raw.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
            layer_norm_epsilon: raw.f64_or("layer_norm_epsilon", 1e-5)?,
        })
    }
}

struct Block {
    ln_1: Norm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

pub struct Gpt2 {
    pub config: Gpt2Config,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: Norm,
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
            blocks.push(Block {
                ln_1: layer_norm(w, &format!("{p}.ln_1"), d, c.layer_norm_epsilon, dev)?,
                c_attn: conv1d(w, &format!("{p}.attn.c_attn"), d, 3 * d, dev)?,
                attn_proj: conv1d(w, &format!("{p}.attn.c_proj"), d, d, dev)?,
                ln_2: layer_norm(w, &format!("{p}.ln_2"), d, c.layer_norm_epsilon, dev)?,
                c_fc: conv1d(w, &format!("{p}.mlp.c_fc"), d, c.n_inner, dev)?,
                mlp_proj: conv1d(w, &format!("{p}.mlp.c_proj"), c.n_inner, d, dev)?,
            });
        }
        let ln_f = layer_norm(w, "ln_f", d, c.layer_norm_epsilon, dev)?;
        Ok(Gpt2 { config, wte, wpe, blocks, ln_f })
    }
}

impl CausalLm for Gpt2 {
    fn forward_cached(&self, ids: &Tensor, keep: Option<&Tensor>, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let c = &self.config;
        if ids.rank() != 2 {
            return Err(Error::Shape { op: "gpt2.forward", msg: format!("ids must be [batch, seq], got {:?}", ids.shape()) });
        }
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let start = cache.as_ref().map_or(0, |c| c.len());
        if start + t > c.n_positions {
            return Err(Error::Shape { op: "gpt2.forward", msg: format!("position {} exceeds n_positions {}", start + t, c.n_positions) });
        }
        let pos = Tensor::arange(start as f64, (start + t) as f64, 1.0, crate::DType::U32, ids.device())?;
        let mut h = self.wte.forward(ids)?.add(&self.wpe.forward(&pos)?)?;
        let bias = attention_bias(t, start + t, keep, COMPUTE, ids.device())?;
        let (nh, hd) = (c.n_head as isize, (c.n_embd / c.n_head) as isize);
        let (bi, ti) = (b as isize, t as isize);
        for (i, blk) in self.blocks.iter().enumerate() {
            let qkv = blk.c_attn.forward(&blk.ln_1.forward(&h)?)?;
            let parts = qkv.split(&[c.n_embd; 3], -1)?;
            let heads = |x: &Tensor| x.reshape(&[bi, ti, nh, hd])?.transpose(1, 2);
            let (k, v) = (heads(&parts[1])?, heads(&parts[2])?);
            let (k, v) = match cache.as_deref_mut() {
                Some(cache) => cache.append(i, k, v)?,
                None => (k, v),
            };
            let y = attention(&heads(&parts[0])?, &k, &v, &bias)?;
            let y = y.transpose(1, 2)?.reshape(&[bi, ti, c.n_embd as isize])?;
            h = h.add(&blk.attn_proj.forward(&y)?)?;
            let m = blk.mlp_proj.forward(&blk.c_fc.forward(&blk.ln_2.forward(&h)?)?.gelu_tanh()?)?;
            h = h.add(&m)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        let x = self.ln_f.forward(&h)?;
        Linear::new("lm_head", self.wte.weight.clone(), None).forward(&x)
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn architecture(&self) -> &'static str {
        "gpt2"
    }
}
