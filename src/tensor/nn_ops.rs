//! The ops neural networks are made of: softmax, norms, embedding and indexing, concat,
//! rotary embedding, masks, dropout and cross-entropy. Fused forward kernels where a
//! composition would make several passes over memory; backward rules in tensor ops or in the
//! backend's fused backward kernels.

use std::sync::Arc;

use super::ops::{check_compute, check_same};
use super::Tensor;
use crate::backend::{Device, Storage};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{resolve_axis, Layout};
use crate::rng::Rng;

/// How the two halves of each rotated pair sit in the head dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(i, i + d/2)`: Hugging Face LLaMA ("rotate_half").
    HalfSplit,
    /// Pairs `(2i, 2i + 1)`: GPT-J, the original RoFormer, llama.cpp.
    Interleaved,
}

/// How per-token cross-entropy losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossEntropyReduction {
    /// Mean over the targets that are not ignored (NaN when all are ignored, as in PyTorch).
    Mean,
    /// Sum over the targets that are not ignored.
    Sum,
    /// One loss per target (0 for ignored ones).
    None,
}

fn check_index(op: &'static str, idx: &Tensor) -> Result<()> {
    if idx.dtype().is_int() {
        Ok(())
    } else {
        Err(Error::DType { op, expected: "u32 or i32 indices", got: idx.dtype() })
    }
}

impl Tensor {
    /// Apply a last-axis kernel along any axis by moving that axis last and back.
    fn along_last(&self, axis: isize, op: &'static str, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let ax = resolve_axis(op, axis, self.shape())?;
        let last = self.rank() - 1;
        if ax == last {
            return f(self);
        }
        f(&self.transpose(ax as isize, last as isize)?)?.transpose(ax as isize, last as isize)
    }

    /// `softmax(x)_i = e^{x_i − max x} / Σ_j e^{x_j − max x}` along `axis`.
    /// Backward: `dx = y ⊙ (g − Σ g ⊙ y)`.
    pub fn softmax(&self, axis: isize) -> Result<Tensor> {
        check_compute("softmax", self)?;
        self.along_last(axis, "softmax", |x| {
            let out = Arc::new(x.storage_arc().softmax_last(x.layout(), false)?);
            let y = Tensor::leaf_shared(out.clone(), x.shape());
            Ok(Tensor::from_op_shared(out, x.shape(), "softmax", &[x], move |g| {
                let dot = g.mul(&y)?.sum(&[-1], true)?;
                Ok(vec![Some(y.mul(&g.sub(&dot)?)?)])
            }))
        })
    }

    /// Fused scaled dot-product attention on the CPU: `softmax(scale · q kᵀ + mask) v` with
    /// `q: [b, h, tq, d]` (self) and `k, v: [b, h_kv, tk, d]`, `h` a multiple of `h_kv`, the mask
    /// described by `spec` (see [`AttnSpec`] and `crate::backend::cpu::attention`); the score
    /// matrix is never materialised. Backward recomputes it tile by tile from the saved
    /// log-sum-exp.
    pub fn flash_attention(&self, k: &Tensor, v: &Tensor, spec: &super::AttnSpec) -> Result<Tensor> {
        self.flash_attention_with(k, v, spec, None)
    }

    /// [`Tensor::flash_attention`] with a slot that keeps the GPU kernel's copy of the padding
    /// mask or the packed starts between calls with the same mask (`nn::Mask` holds one per
    /// forward, so the layers share one upload); it is rebuilt when the batch size or the
    /// device differs from the kept one's.
    pub(crate) fn flash_attention_with(
        &self,
        k: &Tensor,
        v: &Tensor,
        spec: &super::AttnSpec,
        device_mask: Option<&std::sync::Mutex<Option<(usize, Tensor)>>>,
    ) -> Result<Tensor> {
        const OP: &str = "flash_attention";
        check_same(OP, self, k)?;
        check_same(OP, self, v)?;
        let bad = |why: String| Err(Error::Shape { op: OP, msg: why });
        if self.rank() != 4 || k.rank() != 4 || k.shape() != v.shape() {
            return bad(format!(
                "q [b, h, tq, d], k and v [b, h_kv, tk, d] expected, got {:?}, {:?}, {:?}",
                self.shape(),
                k.shape(),
                v.shape()
            ));
        }
        let (qs, ks) = (self.shape(), k.shape());
        let dims = crate::backend::cpu::attention::Dims { b: qs[0], h: qs[1], hk: ks[1], tq: qs[2], tk: ks[2], d: qs[3] };
        if ks[0] != dims.b || ks[3] != dims.d || dims.hk == 0 || dims.h % dims.hk != 0 {
            return bad(format!("q {qs:?} and k {ks:?}: batch or head width differ, or the heads are not a multiple of the kv heads"));
        }
        if dims.tk < spec.offset + dims.tq {
            return bad(format!("{} keys for {} queries at offset {}: too few", dims.tk, dims.tq, spec.offset));
        }
        if let Some(keep) = &spec.keep {
            if keep.len() != dims.b * (spec.offset + dims.tq) {
                return bad(format!("keep holds {} flags, [batch {}, {}] expected", keep.len(), dims.b, spec.offset + dims.tq));
            }
        }
        if let Some(starts) = &spec.starts {
            crate::nn::attention::check_starts(starts, spec.offset + dims.tq, spec.causal)?;
            if self.device().is_gpu() && (spec.keep.is_some() || starts.iter().any(|&s| s >= 1 << 24)) {
                return Err(Error::Unsupported {
                    op: OP,
                    device: self.device().to_string(),
                    msg: "packed sequences with padding, or beyond 2^24 positions, run through the composed attention on the GPU".into(),
                });
            }
        }
        // The GPU kernels read contiguous operands and the padding mask (or the packed
        // sequences' starts, one per batch row's position) as an f32 buffer.
        let gpu = self.device().is_gpu();
        let (qc, kc, vc) = if gpu { (self.compact()?, k.compact()?, v.compact()?) } else { (self.clone(), k.clone(), v.clone()) };
        let upload = || -> Result<Option<Tensor>> {
            Ok(match (&spec.keep, &spec.starts) {
                (Some(keep), _) => {
                    let f: Vec<f32> = keep.iter().map(|&x| f32::from(u8::from(x))).collect();
                    Some(Tensor::from_vec(f, &[keep.len()], self.device())?)
                }
                (None, Some(starts)) => {
                    let f: Vec<f32> = (0..dims.b).flat_map(|_| starts.iter().map(|&s| s as f32)).collect();
                    let n = f.len();
                    Some(Tensor::from_vec(f, &[n], self.device())?)
                }
                _ => None,
            })
        };
        let keep = match (gpu, device_mask) {
            (false, _) => None,
            (true, None) => upload()?,
            (true, Some(slot)) => {
                let mut memo = slot.lock().unwrap_or_else(|e| e.into_inner());
                match &*memo {
                    Some((b, t)) if *b == dims.b && t.device() == self.device() => Some(t.clone()),
                    _ => {
                        let t = upload()?;
                        *memo = t.clone().map(|t| (dims.b, t));
                        t
                    }
                }
            }
        };
        let keep_st = keep.as_ref().map(|t| t.storage_arc());
        let (o, lse) = qc.storage_arc().flash_attention(
            qc.layout(),
            &kc.storage_arc(),
            kc.layout(),
            &vc.storage_arc(),
            vc.layout(),
            keep_st.as_deref(),
            dims,
            spec,
        )?;
        let o = Arc::new(o);
        let out = Tensor::leaf_shared(o.clone(), self.shape());
        let (q, k_, v_, spec) = (qc.detach(), kc.detach(), vc.detach(), spec.clone());
        Ok(Tensor::from_op_shared(o, self.shape(), OP, &[&qc, &kc, &vc], move |g| {
            let g = if g.device().is_gpu() { g.compact()? } else { g.clone() };
            let keep_st = keep.as_ref().map(|t| t.storage_arc());
            let (dq, dk, dv) = q.storage_arc().flash_attention_backward(
                q.layout(),
                &k_.storage_arc(),
                k_.layout(),
                &v_.storage_arc(),
                v_.layout(),
                &out.storage_arc(),
                &lse,
                &g.storage_arc(),
                g.layout(),
                keep_st.as_deref(),
                dims,
                &spec,
            )?;
            Ok(vec![
                Some(Tensor::from_storage(dq, q.shape())),
                Some(Tensor::from_storage(dk, k_.shape())),
                Some(Tensor::from_storage(dv, v_.shape())),
            ])
        }))
    }

    /// `log_softmax(x)_i = x_i − max x − log Σ_j e^{x_j − max x}` along `axis`.
    /// Backward: `dx = g − e^y Σ g`.
    pub fn log_softmax(&self, axis: isize) -> Result<Tensor> {
        check_compute("log_softmax", self)?;
        self.along_last(axis, "log_softmax", |x| {
            let out = Arc::new(x.storage_arc().softmax_last(x.layout(), true)?);
            let y = Tensor::leaf_shared(out.clone(), x.shape());
            Ok(Tensor::from_op_shared(out, x.shape(), "log_softmax", &[x], move |g| {
                let s = g.sum(&[-1], true)?;
                Ok(vec![Some(g.sub(&y.exp()?.mul(&s)?)?)])
            }))
        })
    }

    fn norm_last(&self, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64, rms: bool) -> Result<Tensor> {
        let name = if rms { "rms_norm" } else { "layer_norm" };
        check_compute(name, self)?;
        if self.rank() == 0 {
            return Err(Error::Shape { op: name, msg: "needs at least one axis".into() });
        }
        if eps.is_nan() || eps < 0.0 {
            return Err(Error::InvalidArgument { op: name, msg: format!("eps must be ≥ 0, got {eps}") });
        }
        let d = *self.shape().last().unwrap_or(&1);
        for p in [weight, bias].into_iter().flatten() {
            check_same(name, self, p)?;
            if p.shape() != [d] {
                return Err(Error::ShapeMismatch { op: name, lhs: self.shape().to_vec(), rhs: p.shape().to_vec() });
            }
        }
        let (ws, bs) = (weight.map(|w| w.compact()).transpose()?, bias.map(|b| b.compact()).transpose()?);
        let (wst, bst) = (ws.as_ref().map(|w| w.storage_arc()), bs.as_ref().map(|b| b.storage_arc()));
        let (y, mean, rstd) = self.storage_arc().norm_last(self.layout(), wst.as_deref(), bst.as_deref(), eps, rms)?;
        let x = self.detach();
        let w = ws.as_ref().map(|w| w.detach());
        let (has_w, has_b) = (weight.is_some(), bias.is_some());
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        Ok(Tensor::from_op(y, self.shape(), name, &inputs, move |g| {
            let ws = w.as_ref().map(|w| w.storage_arc());
            let (dx, dw, db) =
                x.storage_arc().norm_last_backward(x.layout(), ws.as_deref(), &g.storage_arc(), g.layout(), &mean, &rstd, rms)?;
            let mut grads = vec![Some(Tensor::from_storage(dx, x.shape()))];
            if has_w {
                grads.push(Some(Tensor::from_storage(dw, &[d])));
            }
            if has_b {
                // The kernels sum db beside dw; without a weight, db is the row sum of g.
                let db = if has_w { Tensor::from_storage(db, &[d]) } else { g.reshape(&[-1, d as isize])?.sum(&[0], false)? };
                grads.push(Some(db));
            }
            Ok(grads)
        }))
    }

    /// Layer norm over the last axis: `(x − μ)/√(σ² + eps) ⊙ w + b` (biased variance).
    pub fn layer_norm(&self, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        self.norm_last(weight, bias, eps, false)
    }

    /// RMS norm over the last axis: `x/√(mean(x²) + eps) ⊙ w`.
    pub fn rms_norm(&self, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        self.norm_last(weight, None, eps, true)
    }

    /// Rows `idx[j]` of `axis`: `out[.., j, ..] = x[.., idx[j], ..]`. `idx` is 1-d U32/I32.
    /// Backward: `index_add` (duplicate indices accumulate).
    pub fn index_select(&self, axis: isize, idx: &Tensor) -> Result<Tensor> {
        check_index("index_select", idx)?;
        if idx.rank() != 1 {
            return Err(Error::Shape { op: "index_select", msg: format!("indices must be 1-d, got shape {:?}", idx.shape()) });
        }
        let ax = resolve_axis("index_select", axis, self.shape())?;
        let out = self.storage_arc().index_select(self.layout(), ax, &idx.storage_arc(), idx.layout())?;
        let mut shape = self.shape().to_vec();
        shape[ax] = idx.numel();
        let (src, idx) = (self.shape().to_vec(), idx.detach());
        Ok(Tensor::from_op(out, &shape, "index_select", &[self], move |g| {
            let s = g.storage_arc().index_add(g.layout(), &src, ax, &idx.storage_arc(), idx.layout())?;
            Ok(vec![Some(Tensor::from_storage(s, &src))])
        }))
    }

    /// Embedding lookup: `ids` of any shape into the rows of `self` `[vocab, d]` →
    /// `ids.shape + [d]`. The backward scatter-adds into the used rows.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        if self.rank() != 2 {
            return Err(Error::Shape { op: "embedding", msg: format!("table must be [vocab, dim], got {:?}", self.shape()) });
        }
        let mut shape = ids.shape().to_vec();
        shape.push(self.shape()[1]);
        let rows = self.index_select(0, &ids.flatten_all()?)?;
        // A frozen table kept in half precision or quantised gives f32 rows (a quantised one
        // decodes only the rows it picks).
        let rows = if rows.dtype().is_compute() { rows } else { rows.to_dtype(crate::nn::COMPUTE)? };
        rows.reshape_to(&shape)
    }

    /// `out[i] = x[i with axis coordinate replaced by idx[i]]`; `idx` has the output's shape,
    /// no larger than `x` on the other axes (as `torch.gather`). Backward: scatter-add.
    pub fn gather(&self, axis: isize, idx: &Tensor) -> Result<Tensor> {
        check_index("gather", idx)?;
        let ax = resolve_axis("gather", axis, self.shape())?;
        if idx.rank() != self.rank() || idx.shape().iter().zip(self.shape()).enumerate().any(|(i, (&a, &b))| i != ax && a > b) {
            return Err(Error::ShapeMismatch { op: "gather", lhs: self.shape().to_vec(), rhs: idx.shape().to_vec() });
        }
        let out = self.storage_arc().gather(self.layout(), ax, &idx.storage_arc(), idx.layout())?;
        let (src, idx, shape) = (self.shape().to_vec(), idx.detach(), idx.shape().to_vec());
        Ok(Tensor::from_op(out, &shape, "gather", &[self], move |g| {
            let s = g.storage_arc().scatter_add(g.layout(), &src, ax, &idx.storage_arc(), idx.layout())?;
            Ok(vec![Some(Tensor::from_storage(s, &src))])
        }))
    }

    /// Join tensors along `axis`; they must agree on every other axis. Backward: `narrow`.
    pub fn concat(parts: &[&Tensor], axis: isize) -> Result<Tensor> {
        let first = parts.first().ok_or_else(|| Error::InvalidArgument { op: "concat", msg: "needs at least one tensor".into() })?;
        let ax = resolve_axis("concat", axis, first.shape())?;
        for p in parts {
            if p.dtype() != first.dtype() {
                return Err(Error::DTypeMismatch { op: "concat", lhs: first.dtype(), rhs: p.dtype() });
            }
            if p.device() != first.device() {
                return Err(Error::DeviceMismatch { op: "concat", lhs: first.device().to_string(), rhs: p.device().to_string() });
            }
            let same = p.rank() == first.rank() && p.shape().iter().zip(first.shape()).enumerate().all(|(i, (a, b))| i == ax || a == b);
            if !same {
                return Err(Error::ShapeMismatch { op: "concat", lhs: first.shape().to_vec(), rhs: p.shape().to_vec() });
            }
        }
        let storages: Vec<Arc<Storage>> = parts.iter().map(|p| p.storage_arc()).collect();
        let pairs: Vec<(&Storage, &Layout)> = storages.iter().map(|s| s.as_ref()).zip(parts.iter().map(|p| p.layout())).collect();
        let out = Storage::concat(&pairs, ax)?;
        let sizes: Vec<usize> = parts.iter().map(|p| p.shape()[ax]).collect();
        let mut shape = first.shape().to_vec();
        shape[ax] = sizes.iter().sum();
        Ok(Tensor::from_op(out, &shape, "concat", parts, move |g| {
            g.split(&sizes, ax as isize)?.into_iter().map(|t| t.contiguous().map(Some)).collect::<Result<_>>()
        }))
    }

    /// Rotary position embedding of `self` `[.., seq, head_dim]`, rotating each pair by the
    /// angle `pos · θ_i` whose cosines and sines are given as `[seq, head_dim/2]` tables (see
    /// [`Tensor::rope_tables`]): `(a, b) → (a cos − b sin, b cos + a sin)`. The backward rotates
    /// the gradient back by `−θ` (a rotation's adjoint is its inverse).
    pub fn rope(&self, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
        check_compute("rope", self)?;
        check_same("rope", self, cos)?;
        check_same("rope", self, sin)?;
        if self.rank() < 2 || self.shape()[self.rank() - 1] % 2 != 0 {
            return Err(Error::Shape {
                op: "rope",
                msg: format!("needs [.., seq, head_dim] with an even head_dim, got {:?}", self.shape()),
            });
        }
        let (seq, dim) = (self.shape()[self.rank() - 2], self.shape()[self.rank() - 1]);
        for t in [cos, sin] {
            if t.shape() != [seq, dim / 2] {
                return Err(Error::ShapeMismatch { op: "rope", lhs: self.shape().to_vec(), rhs: t.shape().to_vec() });
            }
        }
        let (cos, sin) = (cos.compact()?.detach(), sin.compact()?.detach());
        let inter = layout == RopeLayout::Interleaved;
        let out = self.storage_arc().rope(self.layout(), &cos.storage_arc(), &sin.storage_arc(), inter, false)?;
        Ok(Tensor::from_op(out, self.shape(), "rope", &[self], move |g| {
            let s = g.storage_arc().rope(g.layout(), &cos.storage_arc(), &sin.storage_arc(), inter, true)?;
            Ok(vec![Some(Tensor::from_storage(s, g.shape()))])
        }))
    }

    /// Cosine and sine tables `[seq, head_dim/2]` for positions `start..start+seq`, with the
    /// frequencies `θ_i = base^{−2i/head_dim}`. Computed in f64, stored as `dtype`.
    pub fn rope_tables(start: usize, seq: usize, head_dim: usize, base: f64, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        Tensor::rope_tables_scaled(start, seq, head_dim, base, 1.0, dtype, device)
    }

    /// [`Tensor::rope_tables`] with linear position scaling: position `p` rotates as `p / factor`.
    pub fn rope_tables_scaled(
        start: usize,
        seq: usize,
        head_dim: usize,
        base: f64,
        factor: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        if head_dim % 2 != 0 || base <= 0.0 || !(factor.is_finite() && factor > 0.0) {
            return Err(Error::InvalidArgument {
                op: "rope_tables",
                msg: format!("head_dim {head_dim} must be even, base {base} and factor {factor} positive"),
            });
        }
        let half = head_dim / 2;
        let (mut c, mut s) = (Vec::with_capacity(seq * half), Vec::with_capacity(seq * half));
        for p in start..start + seq {
            for i in 0..half {
                let angle = p as f64 / factor * base.powf(-2.0 * i as f64 / head_dim as f64);
                c.push(angle.cos());
                s.push(angle.sin());
            }
        }
        let cos = Tensor::from_host_f64(c, &[seq, half], dtype, device)?;
        let sin = Tensor::from_host_f64(s, &[seq, half], dtype, device)?;
        Ok((cos, sin))
    }

    /// Causal keep-mask `[q_len, kv_len]`: 1.0 where query `i` may attend key `j`, i.e.
    /// `j ≤ i + (kv_len − q_len)` (the queries are the last `q_len` positions), else 0.0.
    pub fn causal_mask(q_len: usize, kv_len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        if q_len > kv_len {
            return Err(Error::InvalidArgument { op: "causal_mask", msg: format!("q_len {q_len} exceeds kv_len {kv_len}") });
        }
        let shift = kv_len - q_len;
        let v: Vec<f64> = (0..q_len).flat_map(|i| (0..kv_len).map(move |j| if j <= i + shift { 1.0 } else { 0.0 })).collect();
        Tensor::from_host_f64(v, &[q_len, kv_len], dtype, device)
    }

    /// Padding keep-mask `[batch, len]`: 1.0 for the first `lengths[b]` positions of row b.
    pub fn padding_mask(lengths: &[usize], len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        if let Some(&l) = lengths.iter().find(|&&l| l > len) {
            return Err(Error::InvalidArgument { op: "padding_mask", msg: format!("length {l} exceeds padded length {len}") });
        }
        let v: Vec<f64> = lengths.iter().flat_map(|&l| (0..len).map(move |j| if j < l { 1.0 } else { 0.0 })).collect();
        Tensor::from_host_f64(v, &[lengths.len(), len], dtype, device)
    }

    /// Turn a keep-mask (1 keep, 0 drop) into an additive attention bias: 0 where kept, the
    /// dtype's lowest finite value where dropped (as `transformers` does). Finite rather than
    /// −∞ so that a row with every key dropped (a padding query) gives a harmless uniform
    /// softmax instead of NaN, which would spread through the following layers.
    pub fn mask_to_bias(&self) -> Result<Tensor> {
        check_compute("mask_to_bias", self)?;
        let lowest = if self.dtype() == DType::F32 { f32::MIN as f64 } else { f64::MIN };
        let zero = Tensor::full(&[], 0.0, self.dtype(), self.device())?;
        let low = Tensor::full(&[], lowest, self.dtype(), self.device())?;
        Tensor::where_cond(self, &zero, &low)
    }

    /// Inverted dropout: each element is kept with probability `1 − p` and scaled by
    /// `1/(1 − p)`, using the stream `rng.next_stream()` (the same mask on every device).
    /// Identity when `p == 0` or when not training.
    pub fn dropout(&self, p: f64, training: bool, rng: &mut Rng) -> Result<Tensor> {
        check_compute("dropout", self)?;
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::InvalidArgument { op: "dropout", msg: format!("probability must be in [0, 1], got {p}") });
        }
        if !training || p == 0.0 {
            return Ok(self.clone());
        }
        if p == 1.0 {
            return self.mul_scalar(0.0);
        }
        let u = Tensor::rand_uniform(self.shape(), 0.0, 1.0, self.dtype(), self.device(), rng)?;
        let mask = u.ge_scalar(p)?.mul_scalar(1.0 / (1.0 - p))?;
        self.mul(&mask)
    }

    /// Cross-entropy of `self` logits `[.., classes]` against integer `targets` `[..]`:
    /// `−log softmax(x)[t]` per row, fused (one pass, max-subtracted, never forming the
    /// softmax in memory). Rows whose target is `ignore_index` contribute nothing.
    /// Backward: `(softmax(x) − onehot(t)) · g` per row.
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: i64, reduction: CrossEntropyReduction) -> Result<Tensor> {
        check_compute("cross_entropy", self)?;
        check_index("cross_entropy", targets)?;
        if self.rank() == 0 || self.shape()[..self.rank() - 1] != *targets.shape() {
            return Err(Error::ShapeMismatch { op: "cross_entropy", lhs: self.shape().to_vec(), rhs: targets.shape().to_vec() });
        }
        let c = self.shape()[self.rank() - 1];
        let n = targets.numel();
        let logits = self.reshape_to(&[n, c])?;
        let t = targets.flatten_all()?.contiguous()?.detach();
        let losses = logits.storage_arc().cross_entropy(logits.layout(), &t.storage_arc(), t.layout(), ignore_index)?;
        let x = logits.detach();
        let t2 = t.clone();
        let per_row = Tensor::from_op(losses, &[n], "cross_entropy", &[&logits], move |g| {
            let d = x.storage_arc().cross_entropy_backward(
                x.layout(),
                &t2.storage_arc(),
                t2.layout(),
                &g.storage_arc(),
                g.layout(),
                ignore_index,
            )?;
            Ok(vec![Some(Tensor::from_storage(d, &[n, c]))])
        });
        match reduction {
            CrossEntropyReduction::None => per_row.reshape_to(targets.shape()),
            CrossEntropyReduction::Sum => per_row.sum_all(),
            CrossEntropyReduction::Mean => {
                let count = t.to_vec_f64()?.iter().filter(|&&v| v as i64 != ignore_index).count();
                per_row.sum_all()?.affine(1.0 / count as f64, 0.0)
            }
        }
    }
}
