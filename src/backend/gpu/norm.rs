//! Launcher of `shaders/norm.wgsl`: layer/RMS norm forward, backward and parameter gradients.

use super::softmax::rows_of;
use super::{fbits, Access, GpuStorage, Kernel, Params, Traffic};
use crate::error::Result;
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/norm.wgsl");
const W: Access = Access::Write;
const R: Access = Access::Read;
const FWD: Kernel = Kernel { shader: "norm", source: SRC, entry: "norm_fwd", access: &[(1, W), (2, W), (3, W), (4, R), (5, R), (6, R)] };
const BWD: Kernel = Kernel { shader: "norm", source: SRC, entry: "norm_bwd", access: &[(1, W), (4, R), (5, R), (7, R), (8, R), (9, R)] };
const WGRAD: Kernel =
    Kernel { shader: "norm", source: SRC, entry: "norm_wgrad", access: &[(10, W), (11, W), (4, R), (7, R), (8, R), (9, R)] };

pub(super) fn norm_last(
    x: &GpuStorage,
    layout: &Layout,
    w: Option<&GpuStorage>,
    b: Option<&GpuStorage>,
    eps: f64,
    rms: bool,
) -> Result<(GpuStorage, GpuStorage, GpuStorage)> {
    x.need_f32("norm")?;
    let (rows, d, stride, outer) = rows_of(layout);
    let dev = &x.dev;
    let y = GpuStorage::alloc(dev, x.dtype, layout.numel(), "norm")?;
    let mean = GpuStorage::alloc(dev, x.dtype, if d == 0 { 0 } else { rows }, "norm")?;
    let rstd = GpuStorage::alloc(dev, x.dtype, if d == 0 { 0 } else { rows }, "norm")?;
    if d == 0 {
        return Ok((y, mean, rstd));
    }
    let mut p = Params::new(&[rows as u32, d as u32, stride as u32, fbits(eps), rms as u32, w.is_some() as u32, b.is_some() as u32, 0]);
    let rec = p.layout(&outer)?;
    p.set(7, rec);
    let wb = w.map_or(x.buffer(), |w| w.buffer());
    let bb = b.map_or(x.buffer(), |b| b.buffer());
    let n = layout.numel();
    let passes = if rms { 2 } else { 3 } + w.is_some() as usize + b.is_some() as usize;
    dev.launch(
        &FWD,
        &p,
        &[y.buffer(), mean.buffer(), rstd.buffer(), x.buffer(), wb, bb],
        dev.groups_1d(rows),
        Traffic::words(passes * n, n + 2 * rows),
    )?;
    Ok((y, mean, rstd))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn norm_last_backward(
    x: &GpuStorage,
    layout: &Layout,
    w: Option<&GpuStorage>,
    g: &GpuStorage,
    gl: &Layout,
    mean: &GpuStorage,
    rstd: &GpuStorage,
    rms: bool,
) -> Result<(GpuStorage, GpuStorage, GpuStorage)> {
    x.need_f32("norm_backward")?;
    g.need_f32("norm_backward")?;
    let (rows, d, sx, ox) = rows_of(layout);
    let (_, _, sg, og) = rows_of(gl);
    let dev = &x.dev;
    let dx = GpuStorage::alloc(dev, x.dtype, layout.numel(), "norm_backward")?;
    let pd = if w.is_some() { d } else { 0 };
    let (dw, db) = (GpuStorage::alloc(dev, x.dtype, pd, "norm_backward")?, GpuStorage::alloc(dev, x.dtype, pd, "norm_backward")?);
    if d == 0 {
        return Ok((dx, dw, db));
    }
    let mut p = Params::new(&[rows as u32, d as u32, sx as u32, sg as u32, rms as u32, w.is_some() as u32, 0, 0]);
    let (rx, rg) = (p.layout(&ox)?, p.layout(&og)?);
    p.set(6, rx);
    p.set(7, rg);
    let wb = w.map_or(x.buffer(), |w| w.buffer());
    let n = layout.numel();
    let per = 2 + w.is_some() as usize;
    dev.launch(
        &BWD,
        &p,
        &[dx.buffer(), x.buffer(), wb, g.buffer(), mean.buffer(), rstd.buffer()],
        dev.groups_1d(rows),
        Traffic::words(2 * per * n + 2 * rows, n),
    )?;
    if w.is_some() {
        dev.launch(
            &WGRAD,
            &p,
            &[dw.buffer(), db.buffer(), x.buffer(), g.buffer(), mean.buffer(), rstd.buffer()],
            dev.groups_1d(d.div_ceil(64)),
            Traffic::words(4 * rows * d, 2 * d),
        )?;
    }
    Ok((dx, dw, db))
}
