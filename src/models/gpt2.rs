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

use std::sync::Arc;

use super::{CausalLm, KvCache};
use crate::autograd::checkpoint;
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

#[derive(Clone)]
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
    lm_head: Linear,
    checkpointing: bool,
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
        let lm_head = Linear::new("lm_head", wte.weight.clone(), None);
        Ok(Gpt2 { config, wte, wpe, blocks, ln_f, lm_head, checkpointing: false })
    }
}

impl Block {
    /// `h + Attn(LN(h))`, then `+ MLP(LN(·))`.
    fn forward(&self, c: &Gpt2Config, h: &Tensor, bias: &Tensor, cache: Option<&mut KvCache>, layer: usize) -> Result<Tensor> {
        let (b, t) = (h.shape()[0], h.shape()[1]);
        let (nh, hd) = (c.n_head as isize, (c.n_embd / c.n_head) as isize);
        let (bi, ti) = (b as isize, t as isize);
        let qkv = self.c_attn.forward(&self.ln_1.forward(h)?)?;
        let parts = qkv.split(&[c.n_embd; 3], -1)?;
        let heads = |x: &Tensor| x.reshape(&[bi, ti, nh, hd])?.transpose(1, 2);
        let (k, v) = (heads(&parts[1])?, heads(&parts[2])?);
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        let y = attention(&heads(&parts[0])?, &k, &v, bias)?;
        let y = y.transpose(1, 2)?.reshape(&[bi, ti, c.n_embd as isize])?;
        let h = h.add(&self.attn_proj.forward(&y)?)?;
        let m = self.mlp_proj.forward(&self.c_fc.forward(&self.ln_2.forward(&h)?)?.gelu_tanh()?)?;
        h.add(&m)
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [&mut self.c_attn, &mut self.attn_proj, &mut self.c_fc, &mut self.mlp_proj]
    }
}

impl CausalLm for Gpt2 {
    fn hidden_states(&self, ids: &Tensor, keep: Option<&Tensor>, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let c = &self.config;
        if ids.rank() != 2 {
            return Err(Error::Shape { op: "gpt2.forward", msg: format!("ids must be [batch, seq], got {:?}", ids.shape()) });
        }
        let t = ids.shape()[1];
        let start = cache.as_ref().map_or(0, |c| c.len());
        if start + t > c.n_positions {
            return Err(Error::Shape { op: "gpt2.forward", msg: format!("position {} exceeds n_positions {}", start + t, c.n_positions) });
        }
        let pos = Tensor::arange(start as f64, (start + t) as f64, 1.0, crate::DType::U32, ids.device())?;
        let mut h = self.wte.forward(ids)?.add(&self.wpe.forward(&pos)?)?;
        let bias = attention_bias(t, start + t, keep, self.wte.weight.dtype(), ids.device())?;
        for (i, blk) in self.blocks.iter().enumerate() {
            h = if self.checkpointing && cache.is_none() {
                let (blk, c, bias) = (blk.clone(), c.clone(), bias.clone());
                checkpoint(&[h], Arc::new(move |x: &[Tensor]| blk.forward(&c, &x[0], &bias, None, i)))?
            } else {
                blk.forward(c, &h, &bias, cache.as_deref_mut(), i)?
            };
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        self.ln_f.forward(&h)
    }

    fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks.iter_mut().flat_map(|b| b.linears_mut()).collect()
    }

    fn visit_parameters(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f("transformer.wte.weight", &mut self.wte.weight)?;
        f("transformer.wpe.weight", &mut self.wpe.weight)?;
        for blk in &mut self.blocks {
            blk.ln_1.visit_parameters(f)?;
            blk.ln_2.visit_parameters(f)?;
            for l in blk.linears_mut() {
                l.visit_parameters(f)?;
            }
        }
        self.ln_f.visit_parameters(f)?;
        self.lm_head.weight = self.wte.weight.clone();
        Ok(())
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
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
