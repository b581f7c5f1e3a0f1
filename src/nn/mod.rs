//! Layers: linear, embedding, norms and attention, each a thin struct over tensors and the
//! engine's ops. Every layer has the Hugging Face module path it was loaded from (`name`),
//! the site that fine-tuning methods attach to.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `y = x Wᵀ + b` with `W: [out, in]` (PyTorch `nn.Linear` layout).
#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { name: name.into(), weight, bias }
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// Apply to `x: [.., in]`. Leading axes are flattened so the product is one large matmul.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_f = self.in_features();
        if x.shape().last() != Some(&in_f) {
            return Err(Error::Shape { op: "linear", msg: format!("{}: input {:?} does not end in {in_f}", self.name, x.shape()) });
        }
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("rank ≥ 1 checked") = self.out_features();
        let rows = x.numel() / in_f.max(1);
        let y = x.reshape(&[rows as isize, in_f as isize])?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        };
        y.reshape(&out_shape.iter().map(|&d| d as isize).collect::<Vec<_>>())
    }
}

/// A lookup table `[vocab, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    pub weight: Tensor,
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.embedding(ids)
    }
}

/// Which normalisation a model uses.
#[derive(Debug, Clone)]
pub enum Norm {
    /// `x / √(mean(x²) + eps) ⊙ w`
    Rms { name: String, weight: Tensor, eps: f64 },
    /// `(x − μ)/√(σ² + eps) ⊙ w + b`
    Layer { name: String, weight: Tensor, bias: Tensor, eps: f64 },
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms { weight, eps, .. } => x.rms_norm(Some(weight), *eps),
            Norm::Layer { weight, bias, eps, .. } => x.layer_norm(Some(weight), Some(bias), *eps),
        }
    }
}

/// Scaled dot-product attention with a causal mask and an optional padding keep-mask.
/// `q: [b, h, tq, d]`, `k, v: [b, h, tk, d]` (queries are the last `tq` of the `tk` positions);
/// `keep: [b, tk]` with 1 for real tokens and 0 for padding.
/// `softmax(q kᵀ/√d + causal + padding) v`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
    let r = q.rank();
    let (tq, d) = (q.shape()[r - 2], q.shape()[r - 1]);
    let tk = k.shape()[r - 2];
    let scores = q.matmul(&k.t()?)?.mul_scalar(1.0 / (d as f64).sqrt())?;
    let mut bias = Tensor::causal_mask(tq, tk, q.dtype(), q.device())?.mask_to_bias()?;
    if let Some(keep) = keep {
        let b = keep.shape()[0];
        let pad = keep.to_dtype(q.dtype())?.reshape(&[b as isize, 1, 1, tk as isize])?.mask_to_bias()?;
        bias = bias.add(&pad)?;
    }
    scores.add(&bias)?.softmax(-1)?.matmul(v)
}

/// Repeat each of `n_kv` key/value heads `rep` times along the head axis:
/// `[b, n_kv, t, d] → [b, n_kv·rep, t, d]` (grouped-query attention).
pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let s = x.shape().to_vec();
    let (b, h, t, d) = (s[0], s[1], s[2], s[3]);
    x.unsqueeze(2)?.broadcast_to(&[b, h, rep, t, d])?.contiguous()?.reshape(&[b as isize, (h * rep) as isize, t as isize, d as isize])
}

/// The dtype weights are computed in (f32; storage dtypes are converted on load).
pub const COMPUTE: DType = DType::F32;
