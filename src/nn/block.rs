//! The decoder block every model family shares, and the sites fine-tuning methods attach to.
//!
//! ```text
//! block(h):                                   sites (see BlockHook)
//!   x      = attn_norm(h)
//!   q,k,v  = x W_qᵀ, x W_kᵀ, x W_vᵀ           linear sites (or one fused W_qkv, GPT-2)
//!   q,k    = q_norm(q), k_norm(k)              per head, when the family has QK-norm (Gemma 3)
//!   q,k    = rope(q), rope(k)                 (when the family rotates)
//!   k,v    = kv(k, v)                          attn.kv: after RoPE, before the cache
//!   k,v    = cache ++ (k, v)
//!   a      = attention(q, k, v, mask) W_oᵀ
//!   a      = post_attn_norm(a)                 when the family has one (Gemma 3)
//!   h      = h + attn_out(a)                   attn.out: before the residual add
//!   x      = mlp_norm(h)
//!   m      = act(x W_gateᵀ) ⊙ x W_upᵀ          gated (LLaMA: SwiGLU, Gemma: GeGLU), or act(x W_upᵀ) (GPT-2)
//!   m      = mlp_act(m)                        mlp.act: the inner activation
//!   y      = post_mlp_norm(m W_downᵀ)          the norm when the family has one (Gemma 3)
//!   h      = h + mlp_out(y)                    mlp.out
//!   h      = block_out(h)                      block.out: the residual stream after the block
//! ```
//!
//! A block is global or local: a family with [`BlockConfig::local`] (Gemma 3) has blocks that
//! attend within a sliding window and rotate with their own RoPE base, between global ones.
//!
//! A [`Decoder`] is the stack: positions (RoPE tables), one [`Mask`] per forward, the blocks
//! (each recomputed in backward under gradient checkpointing, hooks included), the final norm,
//! and, on request, every layer's hidden states as `output_hidden_states` returns them.
//! A model family is a [`BlockConfig`] plus its embeddings and weight names.

use std::sync::Arc;

use super::{adapters_enabled, attention, AdaptersScope, Linear, Mask, Norm};
use crate::autograd::checkpoint;
use crate::error::{Error, Result};
use crate::tensor::{RopeLayout, Tensor};

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x σ(x)` (LLaMA's SwiGLU gate).
    Silu,
    /// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))` (GPT-2's `gelu_new`).
    GeluTanh,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => x.silu(),
            Activation::GeluTanh => x.gelu_tanh(),
        }
    }

    /// `act(gate) ⊙ up` as one fused op ([`crate::kernels::glu`]).
    pub fn gated(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let act = match self {
            Activation::Silu => crate::kernels::glu::GluAct::Silu,
            Activation::GeluTanh => crate::kernels::glu::GluAct::GeluTanh,
        };
        gate.glu(up, act)
    }
}

/// Rotary position embedding of queries and keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub layout: RopeLayout,
    /// Linear position scaling (`rope_type = "linear"`): positions are divided by this
    /// factor; 1 for plain RoPE.
    pub linear_factor: f64,
}

impl Rope {
    pub fn plain(theta: f64, layout: RopeLayout) -> Rope {
        Rope { theta, layout, linear_factor: 1.0 }
    }
}

/// The local blocks of a family that interleaves them with global ones (Gemma 3): each
/// attends to at most `window` latest keys (itself included) and rotates with `rope`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalAttention {
    pub window: usize,
    pub rope: Rope,
}

/// What varies between families, the same for every block of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockConfig {
    pub heads: usize,
    /// Key/value heads (`heads` for multi-head attention, fewer for grouped-query).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `None`: positions come from the embeddings (GPT-2).
    pub rope: Option<Rope>,
    pub act: Activation,
    /// Sliding-window attention span of every block, when the family has one.
    pub window: Option<usize>,
    /// The attention of blocks marked [`DecoderBlock::local`], when the family has such blocks.
    pub local: Option<LocalAttention>,
    /// The scale of `q·k` when it is not `1/√head_dim` (Gemma: `query_pre_attn_scalar^-½`).
    pub attn_scale: Option<f64>,
}

impl BlockConfig {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Width of the keys (and values) of one position: `kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

impl SelfAttention {
    /// `(query heads, key/value heads)` of this block: read off the projections' widths (a
    /// compressed model's blocks may have fewer than the config's), the config's for a fused
    /// projection.
    pub fn heads(&self, c: &BlockConfig) -> (usize, usize) {
        match &self.qkv {
            Qkv::Separate { q, k, .. } if c.head_dim > 0 => (q.out_features() / c.head_dim, k.out_features() / c.head_dim),
            _ => (c.heads, c.kv_heads),
        }
    }
}

/// The query, key and value projections: three linears, or one whose output is `[q | k | v]`.
#[derive(Debug, Clone)]
pub enum Qkv {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// GPT-2's `c_attn`.
    Fused(Linear),
}

#[derive(Debug, Clone)]
pub struct SelfAttention {
    /// Module path (`model.layers.3.self_attn`, `transformer.h.3.attn`).
    pub name: String,
    pub qkv: Qkv,
    pub o: Linear,
    /// RMS norms of each query and key head over `head_dim`, before RoPE (Gemma 3's QK-norm).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    /// Module path (`model.layers.3.mlp`).
    pub name: String,
    /// The gate of a gated MLP (`act(x W_gateᵀ) ⊙ x W_upᵀ`); `None`: `act(x W_upᵀ)`.
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
}

/// A fine-tuning method's code at the block's sites. Every method has a default that
/// leaves its tensor unchanged, so a method implements only the sites it needs. The shapes
/// below are those of a padded batch; in the padding-free forward (see [`Decoder::forward`])
/// the batch is one row of `n` packed real tokens, `[1, n, …]`: a hook works token by token
/// (a method that needs the batch's rows puts positions first, which turns packing off). Each runs
/// inside the block (so gradient checkpointing recomputes it) and not at all inside an
/// [`super::adapters_off`] scope.
pub trait BlockHook: Send + Sync + std::fmt::Debug {
    /// `attn.kv`: the keys and values `[b, kv_heads, t, head_dim]` of this forward's positions,
    /// after RoPE and before the KV cache. A method may prepend positions (prefix tuning):
    /// they are seen by every query, are never padding, and are stored in the cache with the
    /// rest. `offset` is the number of real positions already cached (0 on a fresh forward):
    /// a prefix is prepended only then.
    fn attn_kv(&self, _layer: usize, k: Tensor, v: Tensor, _offset: usize) -> Result<(Tensor, Tensor)> {
        Ok((k, v))
    }
    /// Positions a method puts before the real tokens (prefix tuning: `p`, as Hugging Face
    /// counts a prefix in the cache): the real tokens' positions (RoPE, learned positions)
    /// start after them. Asked of the first block's hooks.
    fn positions_before(&self) -> usize {
        0
    }
    /// `mlp.act`: the MLP's inner activation `[b, t, intermediate]`, before the down projection.
    fn mlp_act(&self, _layer: usize, a: Tensor) -> Result<Tensor> {
        Ok(a)
    }
    /// `attn.out`: the attention sublayer's output `[b, t, hidden]`, before the residual add.
    fn attn_out(&self, _layer: usize, y: Tensor) -> Result<Tensor> {
        Ok(y)
    }
    /// `mlp.out`: the MLP sublayer's output `[b, t, hidden]`, before the residual add.
    fn mlp_out(&self, _layer: usize, y: Tensor) -> Result<Tensor> {
        Ok(y)
    }
    /// `block.out`: the residual stream `[b, t, hidden]` after the block.
    fn block_out(&self, _layer: usize, h: Tensor) -> Result<Tensor> {
        Ok(h)
    }
    /// For downcasting to the method's own type.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A method at the model's input (prompt tuning): virtual-token embeddings `[p, hidden]`
/// put before the embedded tokens on a fresh forward (not when continuing from a cache, which
/// already holds them). They take positions `0..p` and are never padding; the model returns
/// the hidden states of the real tokens only.
pub trait InputHook: Send + Sync + std::fmt::Debug {
    fn virtual_tokens(&self) -> Result<Tensor>;
    fn as_any(&self) -> &dyn std::any::Any;
}

/// One transformer block: pre-norm attention and MLP sublayers with residual adds.
#[derive(Debug, Clone)]
pub struct DecoderBlock {
    /// Module path (`model.layers.3`, `transformer.h.3`).
    pub name: String,
    pub index: usize,
    pub attn_norm: Norm,
    pub attn: SelfAttention,
    /// A norm of the attention sublayer's output before the residual add (Gemma 3).
    pub post_attn_norm: Option<Norm>,
    pub mlp_norm: Norm,
    pub mlp: Mlp,
    /// A norm of the MLP sublayer's output before the residual add (Gemma 3).
    pub post_mlp_norm: Option<Norm>,
    /// Attends within [`BlockConfig::local`]'s window and rotates with its RoPE.
    pub local: bool,
    /// Methods attached at this block's sites, run in order.
    pub hooks: Vec<Arc<dyn BlockHook>>,
}

/// What one forward shares between its blocks.
#[derive(Clone)]
pub struct Shared {
    /// RoPE tables for this forward's positions, and how pairs are laid out.
    rope: Option<(Tensor, Tensor, RopeLayout)>,
    pub mask: Mask,
}

impl DecoderBlock {
    /// Every linear layer of the block, in module order.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out: Vec<&mut Linear> = match &mut self.attn.qkv {
            Qkv::Separate { q, k, v } => vec![q, k, v],
            Qkv::Fused(l) => vec![l],
        };
        out.push(&mut self.attn.o);
        out.extend(self.mlp.gate.as_mut());
        out.push(&mut self.mlp.up);
        out.push(&mut self.mlp.down);
        out
    }

    /// Call `f` on every weight, by checkpoint name, in checkpoint order.
    pub fn visit_parameters(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        self.attn_norm.visit_parameters(f)?;
        for l in self.linears_mut() {
            l.visit_parameters(f)?;
        }
        let norms = [&mut self.attn.q_norm, &mut self.attn.k_norm, &mut self.post_attn_norm].into_iter().flatten();
        for n in norms {
            n.visit_parameters(f)?;
        }
        self.mlp_norm.visit_parameters(f)?;
        match &mut self.post_mlp_norm {
            Some(n) => n.visit_parameters(f),
            None => Ok(()),
        }
    }

    /// `f` over the hooks (none inside an adapters-off scope).
    fn hook(&self, x: Tensor, f: impl Fn(&dyn BlockHook, Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if !adapters_enabled() {
            return Ok(x);
        }
        self.hooks.iter().try_fold(x, |x, h| f(h.as_ref(), x))
    }

    fn attention(&self, c: &BlockConfig, x: &Tensor, sh: &Shared, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let heads = |y: Tensor, n: usize, norm: Option<&Norm>| -> Result<Tensor> {
            let y = y.reshape(&[b as isize, t as isize, n as isize, c.head_dim as isize])?;
            match norm {
                Some(norm) => norm.forward(&y)?.transpose(1, 2),
                None => y.transpose(1, 2),
            }
        };
        let (q, k, v) = match &self.attn.qkv {
            Qkv::Separate { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(l) => {
                let mut p = l.forward(x)?.split(&[c.q_dim(), c.kv_dim(), c.kv_dim()], -1)?.into_iter();
                let mut next = || p.next().expect("split gives three parts");
                (next(), next(), next())
            }
        };
        let (nq, nkv) = self.attn.heads(c);
        let (mut q, mut k, v) = (heads(q, nq, self.attn.q_norm.as_ref())?, heads(k, nkv, self.attn.k_norm.as_ref())?, heads(v, nkv, None)?);
        if let Some((cos, sin, layout)) = &sh.rope {
            q = q.rope(cos, sin, *layout)?;
            k = k.rope(cos, sin, *layout)?;
        }
        // attention() scales by 1/√d; another scale is put on the queries.
        if let Some(s) = c.attn_scale {
            let f = s * (c.head_dim as f64).sqrt();
            if (f - 1.0).abs() > 1e-12 {
                q = q.mul_scalar(f)?;
            }
        }
        let (mut k, mut v) = (k, v);
        if adapters_enabled() {
            for h in &self.hooks {
                (k, v) = h.attn_kv(self.index, k, v, sh.mask.offset)?;
            }
        }
        let (k, v) = match cache {
            Some(cache) => cache.append(self.index, k, v)?,
            None => (k, v),
        };
        let y = attention(&q, &k, &v, &sh.mask)?;
        let y = y.transpose(1, 2)?.reshape(&[b as isize, t as isize, (nq * c.head_dim) as isize])?;
        self.attn.o.forward(&y)
    }

    fn mlp(&self, c: &BlockConfig, x: &Tensor) -> Result<Tensor> {
        let up = self.mlp.up.forward(x)?;
        let inner = match &self.mlp.gate {
            Some(gate) => c.act.gated(&gate.forward(x)?, &up)?,
            None => c.act.apply(&up)?,
        };
        let inner = self.hook(inner, |h, a| h.mlp_act(self.index, a))?;
        self.mlp.down.forward(&inner)
    }

    /// The block on the residual stream `h: [b, t, hidden]` (see the module docs).
    pub fn forward(&self, c: &BlockConfig, h: &Tensor, sh: &Shared, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let post = |norm: &Option<Norm>, y: Tensor| match norm {
            Some(n) => n.forward(&y),
            None => Ok(y),
        };
        let a = post(&self.post_attn_norm, self.attention(c, &self.attn_norm.forward(h)?, sh, cache)?)?;
        let h = h.add(&self.hook(a, |hk, y| hk.attn_out(self.index, y))?)?;
        let m = post(&self.post_mlp_norm, self.mlp(c, &self.mlp_norm.forward(&h)?)?)?;
        let h = h.add(&self.hook(m, |hk, y| hk.mlp_out(self.index, y))?)?;
        self.hook(h, |hk, h| hk.block_out(self.index, h))
    }
}

/// The hidden states of a forward.
#[derive(Debug, Clone)]
pub struct Hidden {
    /// The final hidden states (after the final norm), `[b, t, hidden]`.
    pub last: Tensor,
    /// When asked for: what `output_hidden_states` returns in `transformers`, `layers + 1`
    /// tensors: the embedded input `h₀`, the residual stream after each block but the last,
    /// and the final normed states (the same tensor as `last`).
    pub all: Vec<Tensor>,
    /// With virtual tokens (prompt tuning), the final state of the last one `[b, 1, hidden]`:
    /// it predicts the first real token, which PEFT's loss scores too.
    pub last_virtual: Option<Tensor>,
}

/// The stack of blocks with its final norm.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub config: BlockConfig,
    pub blocks: Vec<DecoderBlock>,
    pub norm: Norm,
    /// Recompute each block in backward instead of keeping its activations.
    pub checkpointing: bool,
    /// Methods at the input (see [`InputHook`]).
    pub inputs: Vec<Arc<dyn InputHook>>,
}

impl Decoder {
    /// The blocks on the embedded input `h: [b, t, hidden]` whose first position is real
    /// position `cache.len()` (0 without a cache); `keep: [b, cache.len() + t]` marks padding.
    /// With `all`, every layer's hidden states are returned too.
    ///
    /// A right-padded batch runs padding-free (see [`Packing`]): the real tokens of
    /// every row packed into one row, each attending only to its own sequence, and unpacked
    /// after the final norm (padding positions come back as zeros, where the padded forward
    /// gives values no loss reads).
    pub fn forward(&self, h: Tensor, keep: Option<&Tensor>, mut cache: Option<&mut KvCache>, all: bool) -> Result<Hidden> {
        if h.rank() != 3 {
            return Err(Error::Shape { op: "decoder", msg: format!("hidden states must be [batch, seq, hidden], got {:?}", h.shape()) });
        }
        // The padding flags when the packing decision read them: the masks reuse them.
        let mut flags = None;
        if cache.is_none() && !all {
            if let Some(p) = self.packing(&h, keep, &mut flags)? {
                return self.forward_packed(h, p);
            }
        }
        let t = h.shape()[1];
        let start = cache.as_ref().map_or(0, |c| c.len()) + self.positions_before();
        let real_start = cache.as_ref().map_or(0, |c| c.len());
        let (sh, local) = self.shared(
            &h,
            start,
            t,
            |cos, sin| Ok((cos, sin)),
            |window| Mask::causal(real_start, keep).with_window(window).with_keep_flags(flags.clone()),
        )?;
        let (h, mut states) = self.run_blocks(h, &sh, local.as_ref(), cache.as_deref_mut(), all)?;
        if let Some(c) = cache {
            c.advance(t);
        }
        let last = self.norm.forward(&h)?;
        if all {
            states.push(last.clone());
        }
        Ok(Hidden { last, all: states, last_virtual: None })
    }

    /// What the global blocks and (when some blocks are local) the local ones share in one
    /// forward of `h`: RoPE tables for positions `start..start + t` in `h`'s dtype (f64 when a
    /// test converts the model), passed through `rows` (the packed forward picks each token's
    /// row), and the mask `mask` builds for each kind's window.
    fn shared(
        &self,
        h: &Tensor,
        start: usize,
        t: usize,
        rows: impl Fn(Tensor, Tensor) -> Result<(Tensor, Tensor)>,
        mask: impl Fn(Option<usize>) -> Mask,
    ) -> Result<(Shared, Option<Shared>)> {
        let tables = |r: Option<Rope>| -> Result<Option<(Tensor, Tensor, RopeLayout)>> {
            let Some(r) = r else { return Ok(None) };
            let (cos, sin) = Tensor::rope_tables_scaled(start, t, self.config.head_dim, r.theta, r.linear_factor, h.dtype(), h.device())?;
            let (cos, sin) = rows(cos, sin)?;
            Ok(Some((cos, sin, r.layout)))
        };
        let global = Shared { rope: tables(self.config.rope)?, mask: mask(self.config.window) };
        let local = match self.config.local {
            Some(l) if self.blocks.iter().any(|b| b.local) => Some(Shared { rope: tables(Some(l.rope))?, mask: mask(Some(l.window)) }),
            _ => None,
        };
        Ok((global, local))
    }

    /// Every block on `h` (global blocks under `sh`, local ones under `local`), and with
    /// `all` the input of each.
    fn run_blocks(
        &self,
        mut h: Tensor,
        sh: &Shared,
        local: Option<&Shared>,
        mut cache: Option<&mut KvCache>,
        all: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut states = Vec::new();
        for blk in &self.blocks {
            if all {
                states.push(h.clone());
            }
            let sh = if blk.local { local.unwrap_or(sh) } else { sh };
            h = if self.checkpointing && cache.is_none() {
                let (blk, c, sh) = (blk.clone(), self.config.clone(), sh.clone());
                // The recomputation in backward runs with the adapters as they were now.
                let scope = AdaptersScope::current();
                checkpoint(&[h], Arc::new(move |x: &[Tensor]| scope.run(|| blk.forward(&c, &x[0], &sh, None))))?
            } else {
                blk.forward(&self.config, &h, sh, cache.as_deref_mut())?
            };
        }
        Ok((h, states))
    }

    /// How to run this batch padding-free, or `None` to run it as it is: for a
    /// fresh forward (no cache) of several right-padded rows (each row's real tokens first)
    /// with at least 1/8 of the positions padding, when no method puts positions or virtual
    /// tokens before the real ones; `TINYTUNE_PACK=off` turns it off. `flags_out` gets
    /// `keep`'s flags (`x ≠ 0`) when they were read to decide, for the masks to reuse.
    fn packing(&self, h: &Tensor, keep: Option<&Tensor>, flags_out: &mut Option<Vec<bool>>) -> Result<Option<Packing>> {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var("TINYTUNE_PACK").map_or(true, |v| v != "off")) && !UNPACKED.with(|u| u.get());
        let (b, t) = (h.shape()[0], h.shape()[1]);
        let Some(keep) = keep else { return Ok(None) };
        // The composed attention would build a packed row's full [n, n] scores: no packing then.
        let fused = super::attention::fused_attention_enabled();
        let virtual_tokens = adapters_enabled() && !self.inputs.is_empty();
        if !on || !fused || b < 2 || keep.shape() != [b, t] || self.positions_before() > 0 || virtual_tokens {
            return Ok(None);
        }
        let flags = keep.to_vec_f64()?;
        *flags_out = Some(flags.iter().map(|&x| x != 0.0).collect());
        let mut lengths = Vec::with_capacity(b);
        for row in flags.chunks(t) {
            let len = row.iter().take_while(|&&x| x != 0.0).count();
            if row[len..].iter().any(|&x| x != 0.0) {
                return Ok(None); // not right-padded
            }
            lengths.push(len);
        }
        let n: usize = lengths.iter().sum();
        if n == 0 || 8 * n > 7 * b * t {
            return Ok(None);
        }
        let (mut rows, mut positions, mut starts) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut unpack = vec![n as u32; b * t];
        for (r, &len) in lengths.iter().enumerate() {
            let first = rows.len();
            for j in 0..len {
                unpack[r * t + j] = rows.len() as u32;
                rows.push((r * t + j) as u32);
                positions.push(j as u32);
                starts.push(first);
            }
        }
        let dev = h.device();
        Ok(Some(Packing {
            rows: Tensor::from_vec(rows, &[n], dev)?,
            positions: Tensor::from_vec(positions, &[n], dev)?,
            unpack: Tensor::from_vec(unpack, &[b * t], dev)?,
            starts: Arc::new(starts),
        }))
    }

    /// [`Decoder::forward`] of a right-padded batch `h: [b, t, hidden]` packed as `p` says.
    fn forward_packed(&self, h: Tensor, p: Packing) -> Result<Hidden> {
        let (b, t, d) = (h.shape()[0], h.shape()[1], h.shape()[2]);
        let n = p.starts.len();
        let i = |x: usize| x as isize;
        let x = h.reshape(&[i(b * t), i(d)])?.index_select(0, &p.rows)?.reshape(&[1, i(n), i(d)])?;
        // RoPE by each token's position in its own sequence: rows of the padded batch's tables.
        let (sh, local) = self.shared(
            &h,
            0,
            t,
            |cos, sin| Ok((cos.index_select(0, &p.positions)?, sin.index_select(0, &p.positions)?)),
            |window| Mask::causal(0, None).with_window(window).with_starts(p.starts.clone()),
        )?;
        let (x, _) = self.run_blocks(x, &sh, local.as_ref(), None, false)?;
        let last = self.norm.forward(&x)?.reshape(&[i(n), i(d)])?;
        // Unpack: padding positions take the zero row appended at index n.
        let zero = Tensor::zeros(&[1, d], last.dtype(), last.device())?;
        let last = Tensor::concat(&[&last, &zero], 0)?.index_select(0, &p.unpack)?.reshape(&[i(b), i(t), i(d)])?;
        Ok(Hidden { last, all: Vec::new(), last_virtual: None })
    }

    /// The virtual tokens `[p, hidden]` the input hooks put first (`None`: none, or inside an
    /// adapters-off scope).
    pub fn virtual_tokens(&self) -> Result<Option<Tensor>> {
        if !adapters_enabled() || self.inputs.is_empty() {
            return Ok(None);
        }
        let parts = self.inputs.iter().map(|h| h.virtual_tokens()).collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::concat(&parts.iter().collect::<Vec<_>>(), 0)?))
    }

    /// Positions methods put before the real tokens (see [`BlockHook::positions_before`]);
    /// 0 inside an adapters-off scope.
    pub fn positions_before(&self) -> usize {
        match self.blocks.first() {
            Some(b) if adapters_enabled() => b.hooks.iter().map(|h| h.positions_before()).sum(),
            _ => 0,
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks.iter_mut().flat_map(|b| b.linears_mut()).collect()
    }

    /// Every block weight and the final norm, by checkpoint name.
    pub fn visit_parameters(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        for blk in &mut self.blocks {
            blk.visit_parameters(f)?;
        }
        self.norm.visit_parameters(f)
    }
}

thread_local! {
    static UNPACKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with the padding-free forward off on this thread (the padded batch as it is): for
/// comparing the two, as the tests do. Only forwards called on this thread are affected.
pub fn without_packing<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNPACKED.with(|u| u.set(self.0));
        }
    }
    let _restore = Restore(UNPACKED.with(|u| u.replace(true)));
    f()
}

/// A right-padded batch `[b, t]` packed into one row of its `n` real tokens (the padding-free
/// forward of [`Decoder::forward`]).
struct Packing {
    /// `[n]`: each packed token's index in the flattened `[b·t]` batch.
    rows: Tensor,
    /// `[n]`: each packed token's position in its own sequence (its RoPE angle).
    positions: Tensor,
    /// `[b·t]`: each batch position's packed index; `n` (a zero row) for padding.
    unpack: Tensor,
    /// `[n]`: the packed index where each token's sequence starts (the attention mask).
    starts: Arc<Vec<usize>>,
}

/// Keys and values of every layer for the positions seen so far, `[batch, kv_heads, len, d]`
/// (a prefix a method prepended included). Each step concatenates the new positions onto the
/// old (a copy per step; a preallocated cache is future work).
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> KvCache {
        KvCache { layers: vec![None; num_layers], len: 0 }
    }

    /// Real positions cached so far (a prefix not counted).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append this step's keys and values of `layer`; returns all of them.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::InvalidArgument { op: "kv_cache", msg: format!("layer {layer} of a cache for fewer layers") })?;
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::concat(&[&pk, &k], 2)?, Tensor::concat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Repeat every cached row `k` times along the batch: a prompt prefilled once for `k`
    /// samples of it. Only a cache of one row can be repeated.
    pub fn repeat_batch(&mut self, k: usize) -> Result<()> {
        if k == 1 {
            return Ok(());
        }
        for (k_, v_) in self.layers.iter_mut().flatten() {
            if k_.shape()[0] != 1 {
                return Err(Error::InvalidArgument {
                    op: "kv_cache",
                    msg: format!("repeat_batch needs one row, the cache has {}", k_.shape()[0]),
                });
            }
            *k_ = Tensor::concat(&vec![&*k_; k], 0)?;
            *v_ = Tensor::concat(&vec![&*v_; k], 0)?;
        }
        Ok(())
    }

    /// Record that `t` more positions were processed (called once per forward).
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
