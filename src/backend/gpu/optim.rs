//! Launcher of `shaders/optim.wgsl`: the fused AdamW step.

use super::{fbits, Access, GpuStorage, Kernel, Params, Traffic};
use crate::backend::AdamWStep;
use crate::error::{Error, Result};
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/optim.wgsl");
const W: Access = Access::Write;
const R: Access = Access::Read;
const ADAMW: Kernel =
    Kernel { shader: "optim", source: SRC, entry: "adamw", access: &[(1, W), (2, W), (3, W), (4, R), (5, R), (6, R), (7, R)] };

pub(super) fn adamw_step(
    p: &GpuStorage,
    pl: &Layout,
    g: &GpuStorage,
    gl: &Layout,
    m: &GpuStorage,
    v: &GpuStorage,
    h: &AdamWStep,
) -> Result<(GpuStorage, GpuStorage, GpuStorage)> {
    for s in [p, g, m, v] {
        s.need_f32("adamw_step")?;
    }
    let n = pl.numel();
    if gl.numel() != n || m.len != n || v.len != n {
        return Err(Error::Shape {
            op: "adamw_step",
            msg: format!("param has {n} elements, grad {}, m {}, v {}", gl.numel(), m.len, v.len),
        });
    }
    let dev = &p.dev;
    let (po, mo, vo) = (
        GpuStorage::alloc(dev, p.dtype, n, "adamw")?,
        GpuStorage::alloc(dev, p.dtype, n, "adamw")?,
        GpuStorage::alloc(dev, p.dtype, n, "adamw")?,
    );
    let (step_size, bc2_sqrt) = h.corrections();
    let mut prm = Params::new(&[
        n as u32,
        fbits(h.beta1),
        fbits(h.beta2),
        fbits(h.eps),
        fbits(1.0 - h.lr * h.weight_decay),
        fbits(step_size),
        fbits(bc2_sqrt),
        0,
        0,
    ]);
    let (rp, rg) = (prm.layout(pl)?, prm.layout(gl)?);
    prm.set(7, rp);
    prm.set(8, rg);
    dev.launch(
        &ADAMW,
        &prm,
        &[po.buffer(), mo.buffer(), vo.buffer(), p.buffer(), g.buffer(), m.buffer(), v.buffer()],
        dev.groups_1d(n.div_ceil(256)),
        Traffic::words(4 * n, 3 * n),
    )?;
    Ok((po, mo, vo))
}
