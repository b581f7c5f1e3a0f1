//! Launcher of `shaders/reduce.wgsl`: sum/max/min/argmax/argmin along an axis.

use super::{Access, GpuStorage, Kernel, Params, Traffic};
use crate::backend::ReduceOp;
use crate::dtype::DType;
use crate::error::Result;
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/reduce.wgsl");
const REDUCE: Kernel = Kernel { shader: "reduce", source: SRC, entry: "reduce_axis", access: &[(1, Access::Write), (2, Access::Read)] };

pub(super) fn reduce(x: &GpuStorage, op: ReduceOp, layout: &Layout, axis: usize) -> Result<GpuStorage> {
    x.need_f32("reduce")?;
    let outer = layout.without_axis(axis);
    let n = outer.numel();
    let (code, dtype) = match op {
        ReduceOp::Sum => (0, DType::F32),
        ReduceOp::Max => (1, DType::F32),
        ReduceOp::Min => (2, DType::F32),
        ReduceOp::ArgMax => (3, DType::U32),
        ReduceOp::ArgMin => (4, DType::U32),
    };
    let out = GpuStorage::alloc(&x.dev, dtype, n, "reduce")?;
    let mut p = Params::new(&[n as u32, layout.shape()[axis] as u32, layout.strides()[axis] as u32, code, 0]);
    let rec = p.layout(&outer)?;
    p.set(4, rec);
    x.dev.launch(&REDUCE, &p, &[out.buffer(), x.buffer()], x.dev.groups_1d(n), Traffic::words(layout.numel(), n))?;
    Ok(out)
}
