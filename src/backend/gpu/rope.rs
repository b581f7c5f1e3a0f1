//! Launcher of `shaders/rope.wgsl`: rotary embedding, forward and inverse.

use super::softmax::rows_of;
use super::{Access, GpuStorage, Kernel, Params, Traffic};
use crate::error::Result;
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/rope.wgsl");
const ROPE: Kernel = Kernel {
    shader: "rope",
    source: SRC,
    entry: "rope",
    access: &[(1, Access::Write), (2, Access::Read), (3, Access::Read), (4, Access::Read)],
};

pub(super) fn rope(
    x: &GpuStorage,
    layout: &Layout,
    cos: &GpuStorage,
    sin: &GpuStorage,
    interleaved: bool,
    inverse: bool,
) -> Result<GpuStorage> {
    x.need_f32("rope")?;
    cos.need_f32("rope")?;
    sin.need_f32("rope")?;
    let r = layout.rank();
    let seq = layout.shape()[r - 2];
    let (rows, dim, stride, outer) = rows_of(layout);
    let out = GpuStorage::alloc(&x.dev, x.dtype, layout.numel(), "rope")?;
    let n = rows * (dim / 2);
    if n == 0 {
        return Ok(out);
    }
    let mut p = Params::new(&[n as u32, seq as u32, dim as u32, interleaved as u32, inverse as u32, stride as u32, 0]);
    let rec = p.layout(&outer)?;
    p.set(6, rec);
    x.dev.launch(
        &ROPE,
        &p,
        &[out.buffer(), x.buffer(), cos.buffer(), sin.buffer()],
        x.dev.groups_1d(n.div_ceil(256)),
        Traffic::words(4 * n, 2 * n),
    )?;
    Ok(out)
}
