//! Launcher of `shaders/index.wgsl`: index_select / gather and their adjoints (index_add /
//! scatter_add by a host-built CSR of the indices: deterministic, no atomics).

use super::{Access, GpuStorage, Kernel, Params, Traffic};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{contiguous_strides, Layout};

const SRC: &str = include_str!("../../../shaders/index.wgsl");
const W: Access = Access::Write;
const R: Access = Access::Read;
const SELECT: Kernel = Kernel { shader: "index", source: SRC, entry: "index_select", access: &[(1, W), (2, R), (3, R)] };
const GATHER: Kernel = Kernel { shader: "index", source: SRC, entry: "gather", access: &[(1, W), (2, R), (3, R)] };
const CSR: Kernel = Kernel { shader: "index", source: SRC, entry: "csr_sum", access: &[(1, W), (2, R), (4, R), (5, R)] };

/// The index values, range-checked against `size` as the CPU does.
pub(super) fn checked(idx: &GpuStorage, il: &Layout, size: usize, op: &'static str) -> Result<Vec<usize>> {
    idx.index_values(il, op)?
        .into_iter()
        .map(|i| if i >= 0 && (i as usize) < size { Ok(i as usize) } else { Err(Error::IndexOutOfRange { op, index: i, size }) })
        .collect()
}

/// (rowptr, list): for each of `targets` targets, its sources in ascending order.
fn csr(targets: usize, target_of: impl Iterator<Item = usize> + Clone) -> (Vec<u32>, Vec<u32>) {
    let mut rowptr = vec![0u32; targets + 1];
    for t in target_of.clone() {
        rowptr[t + 1] += 1;
    }
    for i in 0..targets {
        rowptr[i + 1] += rowptr[i];
    }
    let mut fill = rowptr.clone();
    let mut list = vec![0u32; rowptr[targets] as usize];
    for (src, t) in target_of.enumerate() {
        list[fill[t] as usize] = src as u32;
        fill[t] += 1;
    }
    (rowptr, list)
}

pub(super) fn index_select(x: &GpuStorage, layout: &Layout, axis: usize, idx: &GpuStorage, il: &Layout) -> Result<GpuStorage> {
    let shape = layout.shape();
    checked(idx, il, shape[axis], "index_select")?;
    if x.dtype.size_in_bytes() == 2 {
        let wide = super::copy::cast(x, layout, DType::F32)?;
        let sel = index_select(&wide, &Layout::contiguous(shape), axis, idx, il)?;
        let mut out_shape = shape.to_vec();
        out_shape[axis] = il.numel();
        return super::copy::cast(&sel, &Layout::contiguous(&out_shape), x.dtype);
    }
    if x.dtype == DType::F64 {
        return Err(x.dev.unsupported("index_select", "f64 has no GPU kernels"));
    }
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let n = outer * il.numel() * inner;
    let out = GpuStorage::alloc(&x.dev, x.dtype, n, "index_select")?;
    if n == 0 {
        return Ok(out);
    }
    let mut p = Params::new(&[n as u32, shape[axis] as u32, inner as u32, il.numel() as u32, 0, 0]);
    let (rx, ri) = (p.layout(layout)?, p.layout(il)?);
    p.set(4, rx);
    p.set(5, ri);
    x.dev.launch(&SELECT, &p, &[out.buffer(), x.buffer(), idx.buffer()], x.dev.groups_1d(n.div_ceil(256)), Traffic::words(2 * n, n))?;
    Ok(out)
}

pub(super) fn index_add(
    g: &GpuStorage,
    layout: &Layout,
    shape: &[usize],
    axis: usize,
    idx: &GpuStorage,
    il: &Layout,
) -> Result<GpuStorage> {
    g.need_f32("index_add")?;
    let d = shape[axis];
    let ids = checked(idx, il, d, "index_add")?;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let n = outer * d * inner;
    let out = GpuStorage::alloc(&g.dev, g.dtype, n, "index_add")?;
    if n == 0 {
        return Ok(out);
    }
    let (rowptr, list) = csr(d, ids.iter().copied());
    let (rb, lb) = (g.dev.temp_buffer(&rowptr, "csr rowptr")?, g.dev.temp_buffer(&list, "csr list")?);
    let mut p = Params::new(&[n as u32, 1, d as u32, inner as u32, ids.len() as u32, 0]);
    let rec = p.layout(layout)?;
    p.set(5, rec);
    g.dev.launch(
        &CSR,
        &p,
        &[out.buffer(), g.buffer(), &rb, &lb],
        g.dev.groups_1d(n.div_ceil(256)),
        Traffic::words(2 * n + 2 * outer * ids.len() * inner, n),
    )?;
    Ok(out)
}

pub(super) fn gather(x: &GpuStorage, layout: &Layout, axis: usize, idx: &GpuStorage, il: &Layout) -> Result<GpuStorage> {
    x.need_f32("gather")?;
    checked(idx, il, layout.shape()[axis], "gather")?;
    let mut strides = layout.strides().to_vec();
    let stride = std::mem::replace(&mut strides[axis], 0);
    let base = Layout::new(il.shape().to_vec(), strides, layout.offset());
    let n = il.numel();
    let out = GpuStorage::alloc(&x.dev, x.dtype, n, "gather")?;
    if n == 0 {
        return Ok(out);
    }
    let mut p = Params::new(&[n as u32, stride as u32, 0, 0]);
    let (rb, ri) = (p.layout(&base)?, p.layout(il)?);
    p.set(2, rb);
    p.set(3, ri);
    x.dev.launch(&GATHER, &p, &[out.buffer(), x.buffer(), idx.buffer()], x.dev.groups_1d(n.div_ceil(256)), Traffic::words(2 * n, n))?;
    Ok(out)
}

pub(super) fn scatter_add(
    src: &GpuStorage,
    layout: &Layout,
    shape: &[usize],
    axis: usize,
    idx: &GpuStorage,
    il: &Layout,
) -> Result<GpuStorage> {
    src.need_f32("scatter_add")?;
    let ids = checked(idx, il, shape[axis], "scatter_add")?;
    let mut strides = contiguous_strides(shape);
    let stride = std::mem::replace(&mut strides[axis], 0);
    let base = Layout::new(il.shape().to_vec(), strides, 0);
    let n: usize = shape.iter().product();
    let out = GpuStorage::alloc(&src.dev, src.dtype, n, "scatter_add")?;
    if n == 0 {
        return Ok(out);
    }
    let targets: Vec<usize> = base.offsets().zip(ids.iter()).map(|(o, &i)| o + i * stride).collect();
    let (rowptr, list) = csr(n, targets.iter().copied());
    let (rb, lb) = (src.dev.temp_buffer(&rowptr, "csr rowptr")?, src.dev.temp_buffer(&list, "csr list")?);
    let mut p = Params::new(&[n as u32, 0, 0, 0, 0, 0]);
    let rec = p.layout(layout)?;
    p.set(5, rec);
    src.dev.launch(
        &CSR,
        &p,
        &[out.buffer(), src.buffer(), &rb, &lb],
        src.dev.groups_1d(n.div_ceil(256)),
        Traffic::words(2 * n + 2 * ids.len(), n),
    )?;
    Ok(out)
}
