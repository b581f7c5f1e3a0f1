//! Launcher of `shaders/rand.wgsl`: uniform and normal streams from Philox, as `crate::rng`.

use super::{fbits, Access, GpuDevice, GpuStorage, Kernel, Params, Traffic};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/rand.wgsl");
const RAND: Kernel = Kernel { shader: "rand", source: SRC, entry: "rand_fill", access: &[(1, Access::Write)] };

/// `n` elements of the stream `(seed, offset)`: uniform in `[a, b)`, or normal with mean `a`
/// and standard deviation `b`. Generated in f32, then cast for f16/bf16.
#[allow(clippy::too_many_arguments)]
pub(super) fn rand(dev: &GpuDevice, dtype: DType, n: usize, seed: u64, offset: u64, normal: bool, a: f64, b: f64) -> Result<GpuStorage> {
    let op = if normal { "rand_normal" } else { "rand_uniform" };
    match dtype {
        DType::F32 => {}
        DType::F16 | DType::BF16 => {
            let wide = rand(dev, DType::F32, n, seed, offset, normal, a, b)?;
            return super::copy::cast(&wide, &Layout::contiguous(&[n]), dtype);
        }
        DType::F64 => return Err(dev.unsupported(op, "f64 has no GPU kernels")),
        d => return Err(Error::DType { op, expected: "a float dtype", got: d }),
    }
    if n > u32::MAX as usize / 2 {
        return Err(dev.unsupported(op, "more than 2³¹ elements"));
    }
    let out = GpuStorage::alloc(dev, DType::F32, n, op)?;
    let blocks = n.div_ceil(if normal { 2 } else { 4 });
    let p =
        Params::new(&[n as u32, seed as u32, (seed >> 32) as u32, offset as u32, (offset >> 32) as u32, normal as u32, fbits(a), fbits(b)]);
    dev.launch(&RAND, &p, &[out.buffer()], dev.groups_1d(blocks.div_ceil(256)), Traffic::words(0, n))?;
    Ok(out)
}
