//! Launcher of `shaders/matmul.wgsl`: batched, strided, 32×32 tiles with 4×4 register blocks.

use super::{Access, GpuStorage, Kernel, Params, Traffic};
use crate::error::{Error, Result};
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/matmul.wgsl");
const ACCESS: &[(u32, Access)] = &[(1, Access::Write), (2, Access::Read), (3, Access::Read)];
const MATMUL: Kernel = Kernel { shader: "matmul", source: SRC, entry: "matmul", access: ACCESS };
const MATMUL_REG: Kernel = Kernel { shader: "matmul", source: SRC, entry: "matmul_reg", access: ACCESS };

/// Which matmul kernel a device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulKernel {
    /// Workgroup-shared 32×16 / 16×32 tiles, 4×4 register blocks (GPUs).
    Tiled,
    /// 4×4 register blocks read straight from the buffers (software adapters: lavapipe is
    /// slow with workgroup memory and barriers).
    Registers,
}

fn batch_layout(l: &Layout) -> Layout {
    let r = l.rank();
    Layout::new(l.shape()[..r - 2].to_vec(), l.strides()[..r - 2].to_vec(), l.offset())
}

/// The format code of a weight operand's storage as the product kernels' `load_w` reads it
/// (`shaders/weights.wgsl`: f32, f16/bf16 widened, quantised blocks decoded in the kernel);
/// any other dtype is an error beside `a`'s.
pub(super) fn weight_code(w: &GpuStorage, a: &GpuStorage, op: &'static str) -> Result<u32> {
    super::weight_format(w.dtype).ok_or(Error::DTypeMismatch { op, lhs: a.dtype, rhs: w.dtype })
}

pub(super) fn matmul(a: &GpuStorage, la: &Layout, b: &GpuStorage, lb: &Layout) -> Result<GpuStorage> {
    a.need_f32("matmul")?;
    // B may be a frozen weight kept as stored (16-bit or quantised), decoded inside the kernel.
    let b_code = weight_code(b, a, "matmul")?;
    let r = la.rank();
    let (m, k, n) = (la.shape()[r - 2], la.shape()[r - 1], lb.shape()[r - 1]);
    let (ba, bb) = (batch_layout(la), batch_layout(lb));
    let batch = ba.numel();
    let out = GpuStorage::alloc(&a.dev, a.dtype, batch * m * n, "matmul")?;
    if batch * m * n == 0 {
        return Ok(out);
    }
    if k == 0 {
        super::copy::fill(&out, 0.0)?;
        return Ok(out);
    }
    let (sa, sb) = (la.strides(), lb.strides());
    let mut p = Params::new(&[
        m as u32,
        n as u32,
        k as u32,
        sa[r - 2] as u32,
        sa[r - 1] as u32,
        sb[r - 2] as u32,
        sb[r - 1] as u32,
        0,
        0,
        b_code,
        0,
    ]);
    let (ra, rb) = (p.layout(&ba)?, p.layout(&bb)?);
    p.set(7, ra);
    p.set(8, rb);
    let kernel = match a.dev.matmul_kernel() {
        MatmulKernel::Tiled => &MATMUL,
        MatmulKernel::Registers => &MATMUL_REG,
    };
    let zmax = a.dev.limits().max_compute_workgroups_per_dimension as usize;
    for z0 in (0..batch).step_by(zmax) {
        p.set(10, z0 as u32);
        let zs = (batch - z0).min(zmax);
        // Loads as issued: a tiled workgroup stages 32 rows of A and 32 columns of B per
        // element of k; a register-blocked one has each of its 64 invocations load 4 + 4.
        let groups = n.div_ceil(32) * m.div_ceil(32) * zs;
        let loads = groups * k * if kernel.entry == "matmul" { 64 } else { 512 };
        let traffic = Traffic::bytes(loads / 2 * 4 + super::weight_bytes(b.dtype, loads / 2), 4 * m * n * zs);
        a.dev.launch_weights(
            kernel,
            b_code,
            &p,
            &[out.buffer(), a.buffer(), b.buffer()],
            [n.div_ceil(32) as u32, m.div_ceil(32) as u32, zs as u32],
            traffic,
        )?;
    }
    Ok(out)
}
