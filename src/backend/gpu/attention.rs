//! Launcher of `shaders/attention.wgsl`: fused attention forward (a workgroup per query row,
//! online softmax over blocks of 64 keys) and backward (per-row statistics, then dQ per query
//! row and dK/dV per key row). The mask is `cpu::attention::AttnSpec`'s rule; the CPU kernel
//! is the reference the tests hold this to.

use super::{fbits, Access, GpuStorage, Kernel, Params, Traffic};
use crate::backend::cpu::attention::{AttnSpec, Dims};
use crate::error::{Error, Result};

const SRC: &str = include_str!("../../../shaders/attention.wgsl");
const W: Access = Access::Write;
const R: Access = Access::Read;
const FWD: Kernel =
    Kernel { shader: "attention", source: SRC, entry: "attn_fwd", access: &[(1, W), (2, W), (3, R), (4, R), (5, R), (6, R)] };
const PREP: Kernel = Kernel { shader: "attention", source: SRC, entry: "attn_bwd_prep", access: &[(10, W), (7, R), (8, R), (9, R)] };
const DQ: Kernel =
    Kernel { shader: "attention", source: SRC, entry: "attn_bwd_dq", access: &[(12, W), (3, R), (4, R), (5, R), (8, R), (11, R), (6, R)] };
const DKV: Kernel =
    Kernel { shader: "attention", source: SRC, entry: "attn_bwd_dkv", access: &[(13, W), (3, R), (4, R), (5, R), (8, R), (11, R), (6, R)] };

/// The widest head the kernels hold in workgroup memory.
pub const MAX_HEAD_DIM: usize = 256;

fn params(dims: &Dims, spec: &AttnSpec) -> Params {
    let prefix = dims.tk - spec.offset - dims.tq;
    Params::new(&[
        dims.b as u32,
        dims.h as u32,
        dims.hk as u32,
        dims.tq as u32,
        dims.tk as u32,
        dims.d as u32,
        spec.offset as u32,
        prefix as u32,
        spec.causal as u32,
        // The window clamped to u32 (one that wide never masks a real position).
        spec.window.map_or(0, |w| w.min(u32::MAX as usize) as u32),
        spec.keep.is_some() as u32,
        fbits(spec.scale),
        spec.window.is_some() as u32,
        spec.starts.is_some() as u32,
    ])
}

fn check(q: &GpuStorage, dims: &Dims) -> Result<()> {
    q.need_f32("flash_attention")?;
    if dims.d > MAX_HEAD_DIM {
        return Err(Error::InvalidArgument {
            op: "flash_attention",
            msg: format!("head width {} is above the GPU kernel's {MAX_HEAD_DIM}", dims.d),
        });
    }
    Ok(())
}

/// `(O, L)` from contiguous q, k, v; `keep` is the `[b, offset + tq]` f32 mask when the spec has
/// one, or its packed sequences' starts (as f32) when it has those.
pub(super) fn forward(
    q: &GpuStorage,
    k: &GpuStorage,
    v: &GpuStorage,
    keep: Option<&GpuStorage>,
    dims: Dims,
    spec: &AttnSpec,
) -> Result<(GpuStorage, GpuStorage)> {
    check(q, &dims)?;
    let rows = dims.b * dims.h * dims.tq;
    let dev = &q.dev;
    let o = GpuStorage::alloc(dev, q.dtype, rows * dims.d, "flash_attention")?;
    let lse = GpuStorage::alloc(dev, q.dtype, rows, "flash_attention")?;
    if rows == 0 || dims.d == 0 {
        return Ok((o, lse));
    }
    let kb = keep.map_or(q.buffer(), |k| k.buffer());
    let kv = dims.b * dims.hk * dims.tk * dims.d;
    dev.launch(
        &FWD,
        &params(&dims, spec),
        &[o.buffer(), lse.buffer(), q.buffer(), k.buffer(), v.buffer(), kb],
        dev.groups_1d(rows),
        Traffic::words(rows * dims.d + rows * dims.tk * dims.d * 2 / dims.h.max(1) + kv, rows * (dims.d + 1)),
    )?;
    Ok((o, lse))
}

/// `(dQ, dK, dV)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    q: &GpuStorage,
    k: &GpuStorage,
    v: &GpuStorage,
    o: &GpuStorage,
    lse: &GpuStorage,
    go: &GpuStorage,
    keep: Option<&GpuStorage>,
    dims: Dims,
    spec: &AttnSpec,
) -> Result<(GpuStorage, GpuStorage, GpuStorage)> {
    check(q, &dims)?;
    go.need_f32("flash_attention_backward")?;
    let rows = dims.b * dims.h * dims.tq;
    let nk = dims.b * dims.hk * dims.tk;
    let dev = &q.dev;
    let dq = GpuStorage::alloc(dev, q.dtype, rows * dims.d, "flash_attention_backward")?;
    let dkv = GpuStorage::alloc(dev, q.dtype, 2 * nk * dims.d, "flash_attention_backward")?;
    if rows == 0 || dims.d == 0 || nk == 0 {
        // Nothing attends: zero gradients (a pooled buffer holds whatever it held before).
        let zero = |n: usize| GpuStorage::from_cpu(dev, &crate::backend::CpuStorage::F32(vec![0.0; n]));
        return Ok((zero(rows * dims.d)?, zero(nk * dims.d)?, zero(nk * dims.d)?));
    }
    let p = params(&dims, spec);
    let stats = GpuStorage::alloc(dev, q.dtype, 2 * rows, "flash_attention_backward")?;
    let kb = keep.map_or(q.buffer(), |k| k.buffer());
    let n = rows * dims.d;
    dev.launch(
        &PREP,
        &p,
        &[stats.buffer(), o.buffer(), go.buffer(), lse.buffer()],
        dev.groups_1d(rows),
        Traffic::words(2 * n + rows, 2 * rows),
    )?;
    // Query-key row pairs the kernels read: the visible ones (masked pairs are skipped).
    let qk = (rows as f64 * dims.tk as f64 * dims.d as f64 * spec.visible_fraction(&dims)).ceil() as usize;
    dev.launch(
        &DQ,
        &p,
        &[dq.buffer(), q.buffer(), k.buffer(), v.buffer(), go.buffer(), stats.buffer(), kb],
        dev.groups_1d(rows),
        Traffic::words(2 * n + 3 * qk / dims.h.max(1) * dims.hk.max(1), n),
    )?;
    dev.launch(
        &DKV,
        &p,
        &[dkv.buffer(), q.buffer(), k.buffer(), v.buffer(), go.buffer(), stats.buffer(), kb],
        dev.groups_1d(nk),
        Traffic::words(2 * nk * dims.d + 2 * qk, 2 * nk * dims.d),
    )?;
    // dK and dV come out of one buffer (one binding fewer: the kernel is at WebGPU's 8).
    Ok((dq, copy_range(&dkv, 0, nk * dims.d)?, copy_range(&dkv, nk * dims.d, nk * dims.d)?))
}

/// Elements `start .. start + n` of an f32 buffer, copied into a buffer of their own.
fn copy_range(src: &GpuStorage, start: usize, n: usize) -> Result<GpuStorage> {
    let out = GpuStorage::alloc(&src.dev, src.dtype, n, "flash_attention_backward")?;
    if n > 0 {
        let (offset, size) = ((start * 4) as u64, (n * 4) as u64);
        src.dev.with_encoder(|enc| enc.copy_buffer_to_buffer(src.buf.raw(), offset, out.buf.raw(), 0, size))?;
    }
    Ok(out)
}
