//! Launcher of `shaders/dequant.wgsl`: a frozen weight kept as stored (f16/bf16 or quantised
//! blocks) decoded to f32 on the device — `to_dtype` (merges, DoRA's norms) and embedding
//! lookups of a quantised table — by the same decoders the product kernels use.

use super::{weight_bytes, weight_format, Access, GpuStorage, Kernel, Params, Traffic};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/dequant.wgsl");
const DEQUANT: Kernel = Kernel { shader: "dequant", source: SRC, entry: "dequant", access: &[(1, Access::Write), (2, Access::Read)] };
const DEQUANT_ROWS: Kernel =
    Kernel { shader: "dequant", source: SRC, entry: "dequant_rows", access: &[(1, Access::Write), (2, Access::Read), (3, Access::Read)] };

/// The format code of a weight kept as stored, or an error naming `op`.
fn code_of(w: &GpuStorage, op: &'static str) -> Result<u32> {
    weight_format(w.dtype).ok_or_else(|| Error::DType { op, expected: "a weight (f32, f16, bf16 or quantised)", got: w.dtype })
}

/// `to_dtype` of a quantised weight (decoded, then cast from f32), or to a quantised dtype:
/// only the same format's whole matrix (a shared copy), as on the CPU; quantising is
/// `Tensor::quantize`'s, on the host.
pub(super) fn cast(x: &GpuStorage, layout: &Layout, dtype: DType) -> Result<GpuStorage> {
    if dtype.is_quant() {
        if dtype == x.dtype && layout.is_contiguous() && layout.offset() == 0 && layout.numel() == x.len {
            return Ok(GpuStorage { dev: x.dev.clone(), buf: x.buf.clone(), dtype, len: x.len, bytes: x.bytes, host: None });
        }
        return Err(Error::InvalidArgument {
            op: "to_dtype",
            msg: format!("{:?} to {dtype:?} on the GPU: quantising takes a whole matrix on the host (Tensor::quantize)", x.dtype),
        });
    }
    let f = dequantize(x, layout)?;
    if dtype == DType::F32 {
        return Ok(f);
    }
    super::copy::cast(&f, &Layout::contiguous(layout.shape()), dtype)
}

/// An embedding lookup in a quantised table: only the rows asked for are decoded (f32 out).
pub(super) fn index_select(w: &GpuStorage, layout: &Layout, axis: usize, idx: &GpuStorage, il: &Layout) -> Result<GpuStorage> {
    if axis != 0 || layout.rank() != 2 {
        return Err(Error::InvalidArgument {
            op: "index_select",
            msg: format!("a {:?} weight is looked up by rows of a matrix; got axis {axis} of shape {:?}", w.dtype, layout.shape()),
        });
    }
    super::index::checked(idx, il, layout.shape()[0], "index_select")?;
    rows(w, layout, idx, il)
}

/// The elements of `layout` of the weight `w`, as contiguous f32.
fn dequantize(w: &GpuStorage, layout: &Layout) -> Result<GpuStorage> {
    let code = code_of(w, "to_dtype")?;
    let n = layout.numel();
    let out = GpuStorage::alloc(&w.dev, DType::F32, n, "dequantize")?;
    let mut p = Params::new(&[n as u32, 0]);
    let rec = p.layout(layout)?;
    p.set(1, rec);
    let traffic = Traffic::bytes(weight_bytes(w.dtype, n), 4 * n);
    w.dev.launch_weights(&DEQUANT, code, &p, &[out.buffer(), w.buffer()], w.dev.groups_1d(n.div_ceil(256)), traffic)?;
    Ok(out)
}

/// Rows `idx` (already range-checked) of the rank-2 weight view `layout`, as f32
/// `[idx.len(), cols]`.
fn rows(w: &GpuStorage, layout: &Layout, idx: &GpuStorage, il: &Layout) -> Result<GpuStorage> {
    let code = code_of(w, "index_select")?;
    let cols = layout.shape()[1];
    let n = il.numel() * cols;
    let out = GpuStorage::alloc(&w.dev, DType::F32, n, "index_select")?;
    if n == 0 {
        return Ok(out);
    }
    let s = layout.strides();
    let mut p = Params::new(&[n as u32, cols as u32, s[0] as u32, s[1] as u32, layout.offset() as u32, 0]);
    let rec = p.layout(il)?;
    p.set(5, rec);
    let traffic = Traffic::bytes(weight_bytes(w.dtype, n) + 4 * il.numel(), 4 * n);
    w.dev.launch_weights(&DEQUANT_ROWS, code, &p, &[out.buffer(), w.buffer(), idx.buffer()], w.dev.groups_1d(n.div_ceil(256)), traffic)?;
    Ok(out)
}
