//! Launcher of `shaders/lora.wgsl`: the fused LoRA linear `y = x wᵀ + s·(xd aᵀ) bᵀ`.
//!
//! `u = xd aᵀ` ([rows, rank], small) is made once by the plain matmul; one kernel then walks
//! the concatenated shared dimension `[x | s·u] · [wᵀ ; bᵀ]`, so `x wᵀ` is neither written nor
//! read back and `y` is written once. `u` is returned too: the backward needs it for `db`.

use super::matmul::{matmul, weight_code, MatmulKernel};
use super::{fbits, Access, GpuStorage, Kernel, Params, Traffic};
use crate::dtype::DType;
use crate::error::Result;
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/lora.wgsl");
const ACCESS: &[(u32, Access)] = &[(1, Access::Write), (2, Access::Read), (3, Access::Read), (4, Access::Read), (5, Access::Read)];
const LORA: Kernel = Kernel { shader: "lora", source: SRC, entry: "lora", access: ACCESS };
const LORA_REG: Kernel = Kernel { shader: "lora", source: SRC, entry: "lora_reg", access: ACCESS };
/// Width of a staged slice of the shared dimension in the tiled kernel.
const TK: usize = 16;

/// `(row stride, column stride)` of a rank-2 layout.
fn rc(l: &Layout) -> (u32, u32) {
    (l.strides()[0] as u32, l.strides()[1] as u32)
}

/// `x [n, k]`, `w [m, k]` (f32, or a frozen weight kept as stored: f16, bf16, quantised), `xd [n, k]`, `a [r, k]`, `b [m, r]`, all read
/// through their rank-2 layouts. Returns `(y [n, m], u [n, r])`, contiguous.
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_linear(
    x: &GpuStorage,
    lx: &Layout,
    w: &GpuStorage,
    lw: &Layout,
    xd: &GpuStorage,
    lxd: &Layout,
    a: &GpuStorage,
    la: &Layout,
    b: &GpuStorage,
    lb: &Layout,
    scale: f64,
) -> Result<(GpuStorage, GpuStorage)> {
    const OP: &str = "lora_linear";
    for s in [x, xd, a, b] {
        s.need_f32(OP)?;
    }
    let w_code = weight_code(w, x, OP)?;
    let (n, k, m, r) = (lx.shape()[0], lx.shape()[1], lw.shape()[0], la.shape()[0]);
    // u = xd aᵀ: the plain matmul (its output is [n, r], a sliver beside y).
    let u = matmul(xd, lxd, a, &la.transpose(0, 1)?)?;
    let dev = &x.dev;
    let y = GpuStorage::alloc(dev, DType::F32, n * m, OP)?;
    if n * m == 0 {
        return Ok((y, u));
    }
    let ((p_rs, p_cs), (w_rs, w_cs), (b_rs, b_cs)) = (rc(lx), rc(lw), rc(lb));
    // R = wᵀ and S = bᵀ: element (p, j) of R is w[j, p].
    let p = Params::new(&[
        n as u32,
        m as u32,
        k as u32,
        r as u32,
        p_rs,
        p_cs,
        w_cs,
        w_rs,
        b_cs,
        b_rs,
        w_code,
        fbits(scale),
        lx.offset() as u32,
        lw.offset() as u32,
        lb.offset() as u32,
    ]);
    let tiled = dev.matmul_kernel() == MatmulKernel::Tiled;
    let kernel = if tiled { &LORA } else { &LORA_REG };
    // Loads as issued: a tiled workgroup stages 32 rows of the left operand and 32 columns of
    // the right one per element of the (slice-padded) shared dimension; a register-blocked one
    // has each of its 64 invocations load 4 + 4 per element.
    let groups = m.div_ceil(32) * n.div_ceil(32);
    let (k1, k2) = if tiled { (k.div_ceil(TK) * TK, r.div_ceil(TK) * TK) } else { (k, r) };
    let per = if tiled { 32 } else { 256 };
    let read = groups * per * (k1 * 4 + k2 * 8) + super::weight_bytes(w.dtype, groups * per * k1);
    dev.launch_weights(
        kernel,
        w_code,
        &p,
        &[y.buffer(), x.buffer(), w.buffer(), u.buffer(), b.buffer()],
        [m.div_ceil(32) as u32, n.div_ceil(32) as u32, 1],
        Traffic::bytes(read, 4 * n * m),
    )?;
    Ok((y, u))
}
