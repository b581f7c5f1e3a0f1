//! Launcher of `shaders/softmax.wgsl`: (log-)softmax over the last axis, a workgroup per row.

use super::{Access, GpuStorage, Kernel, Params, Traffic};
use crate::error::Result;
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/softmax.wgsl");
const SOFTMAX: Kernel = Kernel { shader: "softmax", source: SRC, entry: "softmax_rows", access: &[(1, Access::Write), (2, Access::Read)] };

/// (rows, d, stride of the last axis, layout of the rows) of a tensor viewed as rows of its last axis.
pub(super) fn rows_of(l: &Layout) -> (usize, usize, usize, Layout) {
    let r = l.rank();
    if r == 0 {
        return (1, 1, 1, Layout::new(vec![], vec![], l.offset()));
    }
    let outer = l.without_axis(r - 1);
    (outer.numel(), l.shape()[r - 1], l.strides()[r - 1], outer)
}

pub(super) fn softmax_last(x: &GpuStorage, layout: &Layout, log: bool) -> Result<GpuStorage> {
    x.need_f32("softmax")?;
    let (rows, d, stride, outer) = rows_of(layout);
    let out = GpuStorage::alloc(&x.dev, x.dtype, layout.numel(), "softmax")?;
    if d == 0 {
        return Ok(out);
    }
    let mut p = Params::new(&[rows as u32, d as u32, stride as u32, log as u32, 0]);
    let rec = p.layout(&outer)?;
    p.set(4, rec);
    x.dev.launch(&SOFTMAX, &p, &[out.buffer(), x.buffer()], x.dev.groups_1d(rows), Traffic::words(3 * layout.numel(), layout.numel()))?;
    Ok(out)
}
