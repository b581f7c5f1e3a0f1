//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_` (L2 norm).

use rayon::prelude::*;

use crate::autograd::no_grad;
use crate::backend::{CpuStorage, Device, Storage};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Host sums run over blocks of this many elements, combined in block order, so the result
/// does not depend on the thread count or scheduling.
const BLOCK: usize = 1 << 15;

/// The global L2 norm `‖g‖ = √(Σ_params Σ_i g_i²)` of the gradients of `params` (those without a
/// gradient are skipped; no gradient at all gives 0).
///
/// On a GPU the squares are summed on the device, one scalar per parameter added up there, and
/// one number is read back per device. On the CPU the sum runs in f64 over fixed blocks, so it
/// is the same bits on every run (a bitwise resume depends on it). A NaN or Inf in any gradient
/// gives a NaN or Inf norm.
pub fn grad_norm(params: &[Tensor]) -> Result<f64> {
    let _g = no_grad();
    let mut host = 0.0f64;
    // One running sum of squares per GPU, in the dtype of its first gradient.
    let mut dev_sums: Vec<(Device, Tensor)> = Vec::new();
    for p in params {
        let Some(g) = p.grad() else { continue };
        if !g.dtype().is_compute() {
            return Err(Error::DType { op: "grad_norm", expected: "f32 or f64 gradients", got: g.dtype() });
        }
        if g.numel() == 0 {
            continue;
        }
        match g.device() {
            Device::Cpu => host += host_sum_sq(&g)?,
            dev => {
                let s = g.sqr()?.flatten_all()?.sum_all()?;
                match dev_sums.iter_mut().find(|(d, _)| d == dev) {
                    Some((_, acc)) => *acc = acc.add(&s.to_dtype(acc.dtype())?)?,
                    None => dev_sums.push((dev.clone(), s)),
                }
            }
        }
    }
    for (_, s) in dev_sums {
        host += s.to_scalar()?;
    }
    Ok(host.sqrt())
}

/// `Σ g_i²` of a CPU gradient in f64, over fixed blocks; a contiguous f32/f64 gradient is read
/// in place, any other is copied first.
fn host_sum_sq(g: &Tensor) -> Result<f64> {
    fn blocks<T: Copy + Into<f64> + Sync>(v: &[T]) -> f64 {
        let parts: Vec<f64> = v.par_chunks(BLOCK).map(|c| c.iter().map(|&x| x.into() * x.into()).sum::<f64>()).collect();
        parts.iter().sum()
    }
    let storage = g.storage_arc();
    let (start, n) = (g.layout().offset(), g.numel());
    if g.is_contiguous() {
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) if start + n <= v.len() => return Ok(blocks(&v[start..start + n])),
            Storage::Cpu(CpuStorage::F64(v)) if start + n <= v.len() => return Ok(blocks(&v[start..start + n])),
            _ => {}
        }
    }
    Ok(blocks(&g.to_vec_f64()?))
}

/// Clip gradients by their global L2 norm, as `torch.nn.utils.clip_grad_norm_`: with
/// `n = ‖g‖` ([`grad_norm`]) and `c = max_norm / (n + 1e-6)`, every gradient is multiplied by
/// `c` when `c < 1` (that is, when `n` exceeds `max_norm` by more than the 1e-6) and left alone
/// otherwise. Returns `n`, the norm before clipping.
///
/// A NaN or Inf norm is returned as is and no gradient is touched: the caller should skip the
/// step. `max_norm` must be positive (`f64::INFINITY` never clips).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::InvalidArgument { op: "clip_grad_norm", msg: format!("max_norm must be > 0, got {max_norm}") });
    }
    let norm = grad_norm(params)?;
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let _g = no_grad();
        for p in params {
            if let Some(g) = p.grad() {
                p.set_grad(Some(g.mul_scalar(coef)?))?;
            }
        }
    }
    Ok(norm)
}
