//! The one attention entry point, [`attention`], and the description of what each query may
//! see, [`Mask`].
//!
//! ```text
//! attention(q, k, v, mask) = softmax(q kᵀ/√d + bias(mask)) v
//!     q: [b, h, tq, d]     k, v: [b, h_kv, tk, d]   (h a multiple of h_kv: grouped-query)
//!     tk = prefix + offset + tq:  `prefix` keys every query sees (prefix tuning), then the
//!          real positions 0..offset+tq, of which the queries are the last tq (offset > 0:
//!          the earlier ones come from the KV cache)
//!     query i (absolute position offset + i) sees real key j when
//!          j ≤ offset + i                       (causal)
//!          j > offset + i − window              (sliding window, when given)
//!          keep[b, j] = 1                       (key padding, when given)
//!          j ≥ starts[offset + i]               (packed sequences, when given)
//! ```
//!
//! `starts` packs several sequences into one row (see `nn::block`'s padding-free forward):
//! for each real position, the first position of its sequence, so a query sees only the
//! earlier keys of its own sequence.
//!
//! The mask is a description, not a dense bias, so a fused kernel (flash attention) can read
//! the rule instead of a `[tq, tk]` tensor, and K/V stay un-repeated for grouped-query
//! attention. [`attention_reference`] is the composed implementation every faster one is
//! tested against; [`attention`] is the same composition with the query heads of a group
//! stacked against their shared K/V head, so grouped-query attention never repeats K and V.

use std::sync::{Arc, Mutex};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{AttnSpec, Tensor};

/// Which keys each query of one forward may attend to (see the module docs). One `Mask` is
/// built per forward and shared by every layer; the dense bias the reference needs is built
/// once per (key count, dtype) and reused.
#[derive(Debug, Clone)]
pub struct Mask {
    /// Queries see only keys at or before their own position.
    pub causal: bool,
    /// Real positions before the first query (held in the KV cache).
    pub offset: usize,
    /// Sliding-window span: a query sees at most the `window` latest real keys, itself included.
    pub window: Option<usize>,
    /// `[batch, offset + tq]`: 1 for a real token, 0 for padding; `None` when every row is full.
    pub keep: Option<Tensor>,
    /// `[offset + tq]`: the first position of each position's sequence when sequences are
    /// packed into one row (causal masks only); `None`: one sequence per row.
    pub starts: Option<Arc<Vec<usize>>>,
    bias: Arc<Mutex<Option<(usize, usize, DType, Tensor)>>>,
    /// `keep` read to the host once per forward, for the fused kernel.
    keep_host: Arc<Mutex<Option<Vec<bool>>>>,
    /// The GPU kernel's f32 copy of `keep` or `starts`, uploaded once per forward (every
    /// layer's attention reads the same one).
    device_mask: Arc<Mutex<Option<(usize, Tensor)>>>,
}

impl Mask {
    /// Causal attention for queries that start at real position `offset`.
    pub fn causal(offset: usize, keep: Option<&Tensor>) -> Mask {
        Mask {
            causal: true,
            offset,
            window: None,
            keep: keep.cloned(),
            starts: None,
            bias: Arc::default(),
            keep_host: Arc::default(),
            device_mask: Arc::default(),
        }
    }

    /// The same over packed sequences: `starts[j]` is the first position of position `j`'s
    /// sequence (nondecreasing, `starts[j] ≤ j`).
    pub fn with_starts(mut self, starts: Arc<Vec<usize>>) -> Mask {
        self.starts = Some(starts);
        // A clone of a mask that has run holds its memoised bias and device mask: not this
        // mask's.
        self.bias = Arc::default();
        self.device_mask = Arc::default();
        self
    }

    /// The same with `keep`'s flags already read to the host (`x ≠ 0`, row after row), so the
    /// fused kernel's description does not read them again (a GPU sync); `None` changes nothing.
    pub(crate) fn with_keep_flags(self, flags: Option<Vec<bool>>) -> Mask {
        if let Some(f) = flags {
            *self.keep_host.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        }
        self
    }

    /// The same with a sliding window of `window` keys (`None`: full attention).
    pub fn with_window(mut self, window: Option<usize>) -> Mask {
        self.window = window;
        self
    }

    /// Whether query `i` (of `tq`) sees real key `j`, padding aside.
    pub fn sees(&self, i: usize, j: usize) -> bool {
        let pos = self.offset + i;
        let causal = !self.causal || j <= pos;
        let window = self.window.is_none_or(|w| j > pos || pos - j < w);
        let same_sequence = self.starts.as_ref().is_none_or(|s| j >= s[pos]);
        causal && window && same_sequence
    }

    /// The additive bias `[tq, tk]` (or `[b, 1, tq, tk]` with padding) for `tq` queries and
    /// `tk` keys, the first `tk − offset − tq` of which are a prefix every query sees.
    pub fn bias(&self, tq: usize, tk: usize, dtype: DType, device: &crate::Device) -> Result<Tensor> {
        let real = self.offset + tq;
        if tk < real {
            return Err(Error::Shape { op: "attention", msg: format!("{tk} keys for {tq} queries at offset {}: too few", self.offset) });
        }
        let prefix = tk - real;
        let mut memo = self.bias.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((q, k, d, t)) = memo.as_ref() {
            if (*q, *k, *d) == (tq, tk, dtype) {
                return Ok(t.clone());
            }
        }
        let allowed: Vec<f64> =
            (0..tq).flat_map(|i| (0..tk).map(move |j| if j < prefix || self.sees(i, j - prefix) { 1.0 } else { 0.0 })).collect();
        let allowed = Tensor::from_host_f64(allowed, &[tq, tk], dtype, device)?;
        let mask = match &self.keep {
            None => allowed,
            Some(keep) => {
                if keep.rank() != 2 || keep.shape()[1] != real {
                    return Err(Error::Shape {
                        op: "attention",
                        msg: format!("keep mask must be [batch, {real}], got {:?}", keep.shape()),
                    });
                }
                let b = keep.shape()[0];
                // The prefix is never padding.
                let keep = keep.to_dtype(dtype)?;
                let keep = if prefix > 0 { Tensor::concat(&[&Tensor::ones(&[b, prefix], dtype, device)?, &keep], 1)? } else { keep };
                allowed.mul(&keep.reshape(&[b as isize, 1, 1, tk as isize])?)?
            }
        };
        let bias = mask.mask_to_bias()?;
        *memo = Some((tq, tk, dtype, bias.clone()));
        Ok(bias)
    }
}

fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::Shape {
            op: "attention",
            msg: format!("{why}: q {:?}, k {:?}, v {:?} (q: [b, h, tq, d], k and v: [b, h_kv, tk, d])", q.shape(), k.shape(), v.shape()),
        })
    };
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return bad("q, k, v must have rank 4");
    }
    let (qs, ks) = (q.shape(), k.shape());
    if k.shape() != v.shape() || qs[0] != ks[0] || qs[3] != ks[3] {
        return bad("batch, key count or head width differ");
    }
    if ks[1] == 0 || qs[1] % ks[1] != 0 {
        return bad("the query heads are not a multiple of the key/value heads");
    }
    Ok(())
}

/// Whether [`attention`] uses the fused kernel where there is one (the CPU): yes unless
/// `TINYTUNE_ATTENTION=composed` (for measuring one against the other), read once.
pub fn fused_attention_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TINYTUNE_ATTENTION").map_or(true, |v| v != "composed"))
}

/// The fused kernel's description of `mask` for `tq` queries (scale `1/√d`).
fn spec(mask: &Mask, d: usize) -> Result<AttnSpec> {
    let keep = match &mask.keep {
        None => None,
        Some(keep) => {
            let mut memo = mask.keep_host.lock().unwrap_or_else(|e| e.into_inner());
            if memo.is_none() {
                *memo = Some(keep.to_vec_f64()?.iter().map(|&x| x != 0.0).collect());
            }
            memo.clone()
        }
    };
    Ok(AttnSpec {
        scale: 1.0 / (d as f64).sqrt(),
        causal: mask.causal,
        offset: mask.offset,
        window: mask.window,
        keep,
        starts: mask.starts.clone(),
    })
}

/// Scaled dot-product attention of `q` over `k, v` under `mask` (see the module docs): the
/// fused kernel ([`Tensor::flash_attention`]: the CPU's, or the GPU's for f32 heads up to 256
/// wide), else the composition below.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask) -> Result<Tensor> {
    check_shapes(q, k, v)?;
    let (b, h, tq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    // The fused kernel: on the CPU always, on the GPU for heads up to its width limit (and
    // packed sequences without padding).
    let fits = !q.device().is_gpu()
        || (d <= crate::backend::gpu_attention_max_head_dim() && q.dtype() == DType::F32 && (mask.starts.is_none() || mask.keep.is_none()));
    if let Some(s) = &mask.starts {
        check_starts(s, mask.offset + tq, mask.causal)?;
    }
    if fits && fused_attention_enabled() {
        if let Some(keep) = &mask.keep {
            if keep.rank() != 2 || keep.shape()[1] != mask.offset + tq {
                return Err(Error::Shape {
                    op: "attention",
                    msg: format!("keep mask must be [batch, {}], got {:?}", mask.offset + tq, keep.shape()),
                });
            }
        }
        return q.flash_attention_with(k, v, &spec(mask, d)?, Some(&mask.device_mask));
    }
    let (hk, tk) = (k.shape()[1], k.shape()[2]);
    let rep = h / hk;
    if rep == 1 {
        return attention_reference(q, k, v, mask);
    }
    // Grouped-query attention without repeating K and V: the `rep` query heads that share a
    // key/value head (heads g·rep .. g·rep + rep) are one matrix of rep·tq rows against that
    // head's keys, so the products read K and V once and nothing of the size of K or V is
    // copied (decoding a token: the whole cache, every layer, every step). The same dot
    // products as `attention_reference`, the same softmax rows.
    let i = |x: usize| x as isize;
    let bias = mask.bias(tq, tk, q.dtype(), q.device())?;
    let bias = if bias.rank() == 4 { bias.unsqueeze(1)? } else { bias };
    let qg = q.reshape(&[i(b), i(hk), i(rep * tq), i(d)])?;
    let scores = qg.matmul(&k.t()?)?.mul_scalar(1.0 / (d as f64).sqrt())?;
    let p = scores.reshape(&[i(b), i(hk), i(rep), i(tq), i(tk)])?.add(&bias)?.softmax(-1)?;
    p.reshape(&[i(b), i(hk), i(rep * tq), i(tk)])?.matmul(v)?.reshape(&[i(b), i(h), i(tq), i(d)])
}

/// Packed-sequence starts for `real` positions: one per position, nondecreasing, each at or
/// before its own position, under a causal mask.
pub(crate) fn check_starts(s: &[usize], real: usize, causal: bool) -> Result<()> {
    if !causal || s.len() != real || s.iter().enumerate().any(|(j, &st)| st > j || (j > 0 && st < s[j - 1])) {
        return Err(Error::Shape {
            op: "attention",
            msg: format!(
                "packed-sequence starts must be {real} nondecreasing positions, each ≤ its own, under a causal mask (got {} starts{})",
                s.len(),
                if causal { "" } else { ", not causal" }
            ),
        });
    }
    Ok(())
}

/// The composed reference: repeat the K/V heads, `softmax(q kᵀ/√d + bias) v`.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask) -> Result<Tensor> {
    check_shapes(q, k, v)?;
    let (tq, d) = (q.shape()[2], q.shape()[3]);
    if let Some(s) = &mask.starts {
        check_starts(s, mask.offset + tq, mask.causal)?;
    }
    let rep = q.shape()[1] / k.shape()[1];
    let (k, v) = (repeat_kv(k, rep)?, repeat_kv(v, rep)?);
    let bias = mask.bias(tq, k.shape()[2], q.dtype(), q.device())?;
    let scores = q.matmul(&k.t()?)?.mul_scalar(1.0 / (d as f64).sqrt())?;
    scores.add(&bias)?.softmax(-1)?.matmul(&v)
}

/// Repeat each of `n_kv` key/value heads `rep` times along the head axis:
/// `[b, n_kv, t, d] → [b, n_kv·rep, t, d]` (grouped-query attention).
pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    if x.rank() != 4 {
        return Err(Error::Shape { op: "repeat_kv", msg: format!("expected [b, h, t, d], got {:?}", x.shape()) });
    }
    let s = x.shape().to_vec();
    let (b, h, t, d) = (s[0], s[1], s[2], s[3]);
    x.unsqueeze(2)?.broadcast_to(&[b, h, rep, t, d])?.contiguous()?.reshape(&[b as isize, (h * rep) as isize, t as isize, d as isize])
}
