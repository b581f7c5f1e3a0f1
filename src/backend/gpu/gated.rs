//! Launcher of `shaders/gated.wgsl`: the product `((a ⊙ gc) b + bias) ⊙ gr` in one kernel,
//! the gates in the tile load (prologue) and in the write of the result (epilogue), and the
//! pre-gate value `(a ⊙ gc) b + bias` written beside it when asked.

use super::matmul::{weight_code, MatmulKernel};
use super::{Access, GpuStorage, Kernel, Params, Traffic};
use crate::dtype::DType;
use crate::error::Result;
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/gated.wgsl");
const W: Access = Access::Write;
const R: Access = Access::Read;
const ACCESS: &[(u32, Access)] = &[(1, W), (2, R), (3, R), (4, R), (5, R), (6, R), (7, W)];
const GATED: Kernel = Kernel { shader: "gated", source: SRC, entry: "gated", access: ACCESS };
const GATED_REG: Kernel = Kernel { shader: "gated", source: SRC, entry: "gated_reg", access: ACCESS };

/// `a [m, k]` (f32) and `b [k, n]` (f32, or a frozen weight kept as stored: f16, bf16, quantised) through their rank-2 layouts; `gc [k]`,
/// `bias [n]`, `gr [n]` contiguous f32 vectors when given. Returns `(c [m, n], pre)`, `pre`
/// (`[m, n]`, before the row gate) only when `keep_pre`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gated_matmul(
    a: &GpuStorage,
    la: &Layout,
    b: &GpuStorage,
    lb: &Layout,
    gc: Option<&GpuStorage>,
    bias: Option<&GpuStorage>,
    gr: Option<&GpuStorage>,
    keep_pre: bool,
) -> Result<(GpuStorage, Option<GpuStorage>)> {
    const OP: &str = "gated_matmul";
    a.need_f32(OP)?;
    for s in [gc, bias, gr].into_iter().flatten() {
        s.need_f32(OP)?;
    }
    let b_code = weight_code(b, a, OP)?;
    let (m, k, n) = (la.shape()[0], la.shape()[1], lb.shape()[1]);
    let dev = &a.dev;
    let c = GpuStorage::alloc(dev, DType::F32, m * n, OP)?;
    let pre = if keep_pre { Some(GpuStorage::alloc(dev, DType::F32, m * n, OP)?) } else { None };
    if m * n == 0 {
        return Ok((c, pre));
    }
    // A one-element stand-in for an output that is not written.
    let spare = if keep_pre { None } else { Some(GpuStorage::alloc(dev, DType::F32, 1, OP)?) };
    let flags = gc.is_some() as u32 | (bias.is_some() as u32) << 1 | (gr.is_some() as u32) << 2 | (keep_pre as u32) << 3;
    let (sa, sb) = (la.strides(), lb.strides());
    let p = Params::new(&[
        m as u32,
        n as u32,
        k as u32,
        sa[0] as u32,
        sa[1] as u32,
        sb[0] as u32,
        sb[1] as u32,
        b_code,
        flags,
        la.offset() as u32,
        lb.offset() as u32,
    ]);
    let tiled = dev.matmul_kernel() == MatmulKernel::Tiled;
    let kernel = if tiled { &GATED } else { &GATED_REG };
    // Loads as issued (as matmul.rs counts them), plus one gate per loaded element of A and
    // the bias and row gate per output.
    let groups = n.div_ceil(32) * m.div_ceil(32);
    let loads = groups * k * if tiled { 64 } else { 512 };
    let gate_loads = if gc.is_some() { loads / 2 } else { 0 };
    let epilogue = m * n * (bias.is_some() as usize + gr.is_some() as usize);
    let read = loads / 2 * 4 + super::weight_bytes(b.dtype, loads / 2) + 4 * (gate_loads + epilogue);
    let written = 4 * m * n * (1 + keep_pre as usize);
    fn or_a<'s>(s: Option<&'s GpuStorage>, a: &'s GpuStorage) -> &'s super::GpuBuffer {
        s.map_or(a.buffer(), |s| s.buffer())
    }
    let pre_buf = pre.as_ref().or(spare.as_ref()).expect("one of them is set").buffer();
    dev.launch_weights(
        kernel,
        b_code,
        &p,
        &[c.buffer(), a.buffer(), b.buffer(), or_a(gc, a), or_a(bias, a), or_a(gr, a), pre_buf],
        [n.div_ceil(32) as u32, m.div_ceil(32) as u32, 1],
        Traffic::bytes(read, written),
    )?;
    Ok((c, pre))
}
