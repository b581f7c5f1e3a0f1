//! The backend boundary: the small set of primitive kernels every device implements.
//!
//! The tensor layer (`crate::tensor`) does shapes, broadcasting and autograd; it calls only
//! the methods of [`Storage`] below. A storage is a flat buffer on one device; every kernel
//! reads its inputs through a [`Layout`] (so transposed, narrowed and broadcast views are read
//! in place) and writes a fresh contiguous output. Adding a device means adding a variant to
//! [`Storage`] and [`Device`] and implementing these primitives for it.

pub mod cpu;

use crate::dtype::DType;
use crate::error::Result;
use crate::layout::Layout;
pub use cpu::CpuStorage;

/// Where a tensor's storage lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// Host memory, kernels on rayon.
    Cpu,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
        }
    }
}

/// Comparison used by [`UnaryOp::Cmp`] and [`BinaryOp::Cmp`]; the result is 1.0 or 0.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Element-wise functions of one tensor (plus scalar parameters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Sqr,
    Abs,
    Sign,
    Tanh,
    Sigmoid,
    Erf,
    Relu,
    /// `x Φ(x) = x/2 (1 + erf(x/√2))`
    GeluErf,
    /// `x/2 (1 + tanh(√(2/π)(x + 0.044715 x³)))`
    GeluTanh,
    /// `x σ(x)`
    Silu,
    /// `x^p`
    Powf(f64),
    /// `a·x + b`
    Affine(f64, f64),
    /// `min(max(x, lo), hi)`
    Clamp(f64, f64),
    /// `x ∘ c` as 1.0/0.0
    Cmp(CmpOp, f64),
}

/// Element-wise functions of two tensors of the same (already broadcast) shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Cmp(CmpOp),
}

/// Reductions along one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
    /// Index of the first maximum, as U32.
    ArgMax,
    /// Index of the first minimum, as U32.
    ArgMin,
}

/// A flat buffer on one device.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
}

/// Dispatch a method to the device's storage (one arm per device).
macro_rules! on_device {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Storage::Cpu($s) => $body,
        }
    };
}

/// Unwrap a second storage operand on the same device as the first.
macro_rules! same_device {
    ($other:expr) => {
        match $other {
            Storage::Cpu(s) => s,
        }
    };
}

impl Storage {
    pub fn dtype(&self) -> DType {
        on_device!(self, s => s.dtype())
    }

    pub fn device(&self) -> Device {
        on_device!(self, _s => Device::Cpu)
    }

    /// Number of elements in the buffer.
    pub fn len(&self) -> usize {
        on_device!(self, s => s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All-zero buffer of `n` elements on `device`.
    pub fn zeros(device: &Device, dtype: DType, n: usize) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(CpuStorage::zeros(dtype, n))),
        }
    }

    /// Buffer of `n` copies of `v` (converted to `dtype`).
    pub fn full(device: &Device, dtype: DType, n: usize, v: f64) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(CpuStorage::full(dtype, n, v))),
        }
    }

    /// Upload host data.
    pub fn from_cpu(device: &Device, data: CpuStorage) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(data)),
        }
    }

    /// Copy the elements selected by `layout` to host memory, contiguous, in row-major order.
    pub fn to_cpu(&self, layout: &Layout) -> Result<CpuStorage> {
        on_device!(self, s => s.copy_strided(layout))
    }

    /// Copy into a contiguous buffer of dtype `dtype` (a plain copy when the dtype is the same).
    pub fn cast(&self, layout: &Layout, dtype: DType) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.cast(layout, dtype)?)))
    }

    pub fn unary(&self, op: UnaryOp, layout: &Layout) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.unary(op, layout)?)))
    }

    /// `self` and `rhs` are read through layouts of the same shape (broadcast already applied).
    pub fn binary(&self, op: BinaryOp, layout: &Layout, rhs: &Storage, rhs_layout: &Layout) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.binary(op, layout, same_device!(rhs), rhs_layout)?)))
    }

    /// `cond ? t : f` element-wise; `self` is the condition (non-zero = true); same shapes.
    pub fn where_cond(&self, layout: &Layout, t: &Storage, t_layout: &Layout, f: &Storage, f_layout: &Layout) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.where_cond(layout, same_device!(t), t_layout, same_device!(f), f_layout)?)))
    }

    /// Reduce along `axis`; the output has the input's shape with that axis removed.
    pub fn reduce(&self, op: ReduceOp, layout: &Layout, axis: usize) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.reduce(op, layout, axis)?)))
    }

    /// Batched matrix product. Both layouts have rank ≥ 2 and identical batch dims (broadcast
    /// already applied): `[.., m, k] · [.., k, n] → [.., m, n]`, transposes read in place.
    pub fn matmul(&self, layout: &Layout, rhs: &Storage, rhs_layout: &Layout) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.matmul(layout, same_device!(rhs), rhs_layout)?)))
    }

    /// Softmax (or log-softmax) along the last axis.
    pub fn softmax_last(&self, layout: &Layout, log: bool) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.softmax_last(layout, log)?)))
    }

    /// Layer norm (or RMS norm) over the last axis of `x`, with optional affine weight and
    /// bias of the last axis' length. Returns `(y, mean, rstd)`, mean and rstd per row (mean is
    /// all zeros for RMS norm).
    pub fn norm_last(
        &self,
        layout: &Layout,
        weight: Option<&Storage>,
        bias: Option<&Storage>,
        eps: f64,
        rms: bool,
    ) -> Result<(Storage, Storage, Storage)> {
        on_device!(self, s => {
            let (y, m, r) = s.norm_last(layout, weight.map(|w| same_device!(w)), bias.map(|b| same_device!(b)), eps, rms)?;
            Ok((Storage::Cpu(y), Storage::Cpu(m), Storage::Cpu(r)))
        })
    }

    /// Backward of [`Storage::norm_last`]: from `x`, weight, the output gradient `g` and the saved
    /// `mean`/`rstd`, compute `(dx, dweight, dbias)`; dweight/dbias are summed over rows.
    #[allow(clippy::too_many_arguments)]
    pub fn norm_last_backward(
        &self,
        layout: &Layout,
        weight: Option<&Storage>,
        g: &Storage,
        g_layout: &Layout,
        mean: &Storage,
        rstd: &Storage,
        rms: bool,
    ) -> Result<(Storage, Storage, Storage)> {
        on_device!(self, s => {
            let (dx, dw, db) = s.norm_last_backward(layout, weight.map(|w| same_device!(w)), same_device!(g), g_layout, same_device!(mean), same_device!(rstd), rms)?;
            Ok((Storage::Cpu(dx), Storage::Cpu(dw), Storage::Cpu(db)))
        })
    }

    /// `out[.., j, ..] = self[.., idx[j], ..]` along `axis`; `idx` is a contiguous U32/I32 list.
    pub fn index_select(&self, layout: &Layout, axis: usize, idx: &Storage, idx_layout: &Layout) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.index_select(layout, axis, same_device!(idx), idx_layout)?)))
    }

    /// Adjoint of index_select: a zero tensor of `shape` with `self[.., j, ..]` added into row
    /// `idx[j]` of `axis` (duplicate indices accumulate).
    pub fn index_add(&self, layout: &Layout, shape: &[usize], axis: usize, idx: &Storage, idx_layout: &Layout) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.index_add(layout, shape, axis, same_device!(idx), idx_layout)?)))
    }

    /// `out[i..] = self[i with i_axis replaced by idx[i..]]`; idx has the output's shape.
    pub fn gather(&self, layout: &Layout, axis: usize, idx: &Storage, idx_layout: &Layout) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.gather(layout, axis, same_device!(idx), idx_layout)?)))
    }

    /// Adjoint of gather: zeros of `shape`, then `out[i with i_axis = idx[i]] += self[i]`.
    pub fn scatter_add(&self, layout: &Layout, shape: &[usize], axis: usize, idx: &Storage, idx_layout: &Layout) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.scatter_add(layout, shape, axis, same_device!(idx), idx_layout)?)))
    }

    /// Concatenate along `axis`; all parts have the same dtype and agree on the other axes.
    pub fn concat(parts: &[(&Storage, &Layout)], axis: usize) -> Result<Storage> {
        match parts[0].0 {
            Storage::Cpu(_) => {
                let cpu: Vec<(&CpuStorage, &Layout)> = parts.iter().map(|(s, l)| (same_device!(*s), *l)).collect();
                Ok(Storage::Cpu(CpuStorage::concat(&cpu, axis)?))
            }
        }
    }

    /// Rotary embedding of `x[.., seq, dim]` with `cos`/`sin` of shape `[seq, dim/2]` (contiguous).
    /// `interleaved`: pairs are (2i, 2i+1) (GPT-J / llama.cpp); otherwise (i, i + dim/2)
    /// (Hugging Face LLaMA). `inverse` rotates by −θ (the backward pass).
    pub fn rope(&self, layout: &Layout, cos: &Storage, sin: &Storage, interleaved: bool, inverse: bool) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.rope(layout, same_device!(cos), same_device!(sin), interleaved, inverse)?)))
    }

    /// Cross-entropy per row of logits `[n, c]` with integer targets `[n]`; rows whose target
    /// equals `ignore_index` get loss 0. Returns the per-row losses `[n]`.
    pub fn cross_entropy(&self, layout: &Layout, targets: &Storage, t_layout: &Layout, ignore_index: i64) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.cross_entropy(layout, same_device!(targets), t_layout, ignore_index)?)))
    }

    /// Gradient of the per-row losses wrt the logits: `(softmax(row) − onehot(target))·g[row]`,
    /// zero for ignored rows.
    pub fn cross_entropy_backward(
        &self,
        layout: &Layout,
        targets: &Storage,
        t_layout: &Layout,
        g: &Storage,
        g_layout: &Layout,
        ignore_index: i64,
    ) -> Result<Storage> {
        on_device!(self, s => Ok(Storage::Cpu(s.cross_entropy_backward(layout, same_device!(targets), t_layout, same_device!(g), g_layout, ignore_index)?)))
    }

    /// `n` elements of the uniform stream `(seed, offset)` mapped to `[lo, hi)`.
    pub fn rand_uniform(device: &Device, dtype: DType, n: usize, seed: u64, offset: u64, lo: f64, hi: f64) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(CpuStorage::rand_uniform(dtype, n, seed, offset, lo, hi)?)),
        }
    }

    /// `n` elements of the normal stream `(seed, offset)`, `mean + std·z`.
    pub fn rand_normal(device: &Device, dtype: DType, n: usize, seed: u64, offset: u64, mean: f64, std: f64) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(CpuStorage::rand_normal(dtype, n, seed, offset, mean, std)?)),
        }
    }
}
