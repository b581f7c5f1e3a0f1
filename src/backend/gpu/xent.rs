//! Launcher of `shaders/xent.wgsl`: fused cross-entropy forward and backward.

use super::softmax::rows_of;
use super::{Access, GpuStorage, Kernel, Params, Traffic};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/xent.wgsl");
const FWD: Kernel =
    Kernel { shader: "xent", source: SRC, entry: "xent_fwd", access: &[(1, Access::Write), (2, Access::Read), (3, Access::Read)] };
const BWD: Kernel = Kernel {
    shader: "xent",
    source: SRC,
    entry: "xent_bwd",
    access: &[(1, Access::Write), (2, Access::Read), (3, Access::Read), (4, Access::Read)],
};

/// Check the targets on the host (from the host copy, or a readback) as the CPU does, and
/// return (has_ignore, ignore word) for the shader.
fn check(x: &GpuStorage, c: usize, t: &GpuStorage, tl: &Layout, ignore: i64) -> Result<(u32, u32)> {
    for v in t.index_values(tl, "cross_entropy")? {
        if v != ignore && (v < 0 || v as usize >= c) {
            return Err(Error::IndexOutOfRange { op: "cross_entropy", index: v, size: c });
        }
    }
    let _ = x;
    Ok(match t.dtype {
        DType::U32 if (0..=u32::MAX as i64).contains(&ignore) => (1, ignore as u32),
        DType::I32 if (i32::MIN as i64..=i32::MAX as i64).contains(&ignore) => (1, ignore as i32 as u32),
        _ => (0, 0),
    })
}

pub(super) fn cross_entropy(x: &GpuStorage, layout: &Layout, t: &GpuStorage, tl: &Layout, ignore: i64) -> Result<GpuStorage> {
    x.need_f32("cross_entropy")?;
    let (rows, c, stride, outer) = rows_of(layout);
    let (has, word) = check(x, c, t, tl, ignore)?;
    let out = GpuStorage::alloc(&x.dev, x.dtype, rows, "cross_entropy")?;
    if rows == 0 {
        return Ok(out);
    }
    let mut p = Params::new(&[rows as u32, c as u32, stride as u32, has, word, 0, 0]);
    let (rx, rt) = (p.layout(&outer)?, p.layout(tl)?);
    p.set(5, rx);
    p.set(6, rt);
    x.dev.launch(
        &FWD,
        &p,
        &[out.buffer(), x.buffer(), t.buffer()],
        x.dev.groups_1d(rows),
        Traffic::words(2 * rows * c + 2 * rows, rows),
    )?;
    Ok(out)
}

pub(super) fn cross_entropy_backward(
    x: &GpuStorage,
    layout: &Layout,
    t: &GpuStorage,
    tl: &Layout,
    g: &GpuStorage,
    gl: &Layout,
    ignore: i64,
) -> Result<GpuStorage> {
    x.need_f32("cross_entropy_backward")?;
    g.need_f32("cross_entropy_backward")?;
    let (rows, c, stride, outer) = rows_of(layout);
    let (has, word) = check(x, c, t, tl, ignore)?;
    let out = GpuStorage::alloc(&x.dev, x.dtype, layout.numel(), "cross_entropy_backward")?;
    if rows == 0 || c == 0 {
        return Ok(out);
    }
    let mut p = Params::new(&[rows as u32, c as u32, stride as u32, has, word, 0, 0, 0]);
    let (rx, rt, rg) = (p.layout(&outer)?, p.layout(tl)?, p.layout(gl)?);
    p.set(5, rx);
    p.set(6, rt);
    p.set(7, rg);
    x.dev.launch(
        &BWD,
        &p,
        &[out.buffer(), x.buffer(), t.buffer(), g.buffer()],
        x.dev.groups_1d(rows),
        Traffic::words(3 * rows * c + 2 * rows, rows * c),
    )?;
    Ok(out)
}
