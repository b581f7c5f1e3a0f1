//! Launcher of `shaders/copy.wgsl`: fill, strided copy / dtype cast, concat.

use half::{bf16, f16};

use super::{dtype_code, Access, GpuStorage, Kernel, Params, Traffic};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/copy.wgsl");
const FILL: Kernel = Kernel { shader: "copy", source: SRC, entry: "fill", access: &[(1, Access::Write)] };
const CAST: Kernel = Kernel { shader: "copy", source: SRC, entry: "cast_copy", access: &[(1, Access::Write), (2, Access::Read)] };
const CONCAT: Kernel = Kernel { shader: "copy", source: SRC, entry: "concat_part", access: &[(1, Access::Write), (2, Access::Read)] };

/// The 32-bit word that holds `v` converted to `dtype` (twice for 16-bit dtypes).
fn fill_word(dtype: DType, v: f64) -> u32 {
    match dtype {
        DType::F32 => (v as f32).to_bits(),
        DType::F16 => {
            let h = f16::from_f64(v).to_bits() as u32;
            h | (h << 16)
        }
        DType::BF16 => {
            let h = bf16::from_f64(v).to_bits() as u32;
            h | (h << 16)
        }
        DType::U32 => v as u32,
        DType::I32 => (v as i32) as u32,
        DType::F64 | DType::Quant(_) => unreachable!("no f64 or quantised storage on the GPU"),
    }
}

/// Set every element of `out` to `v`.
pub(super) fn fill(out: &GpuStorage, v: f64) -> Result<()> {
    let words = (out.len * out.dtype.size_in_bytes()).div_ceil(4);
    let p = Params::new(&[words as u32, fill_word(out.dtype, v)]);
    out.dev.launch(&FILL, &p, &[out.buffer()], out.dev.groups_1d(words.div_ceil(256)), Traffic::words(0, words))
}

/// The elements of `layout` in `dtype`, contiguous.
pub(super) fn cast(x: &GpuStorage, layout: &Layout, dtype: DType) -> Result<GpuStorage> {
    if x.dtype == DType::F64 || dtype == DType::F64 {
        return Err(x.dev.unsupported("cast", "f64 has no GPU kernels; move to the CPU first"));
    }
    let n = layout.numel();
    let out = GpuStorage::alloc(&x.dev, dtype, n, "cast")?;
    let mut p = Params::new(&[n as u32, dtype_code(x.dtype), dtype_code(dtype), 0]);
    let rec = p.layout(layout)?;
    p.set(3, rec);
    let words = if dtype.size_in_bytes() == 2 { n.div_ceil(2) } else { n };
    x.dev.launch(
        &CAST,
        &p,
        &[out.buffer(), x.buffer()],
        x.dev.groups_1d(words.div_ceil(256)),
        Traffic::bytes(n * x.dtype.size_in_bytes(), n * dtype.size_in_bytes()),
    )?;
    Ok(out)
}

/// Concatenate along `axis`; 16-bit dtypes go through f32 (exactly) and back.
pub(super) fn concat(parts: &[(&GpuStorage, &Layout)], axis: usize) -> Result<GpuStorage> {
    let (first, l0) = parts[0];
    let dtype = first.dtype;
    for (s, _) in parts {
        if s.dtype != dtype {
            return Err(Error::DTypeMismatch { op: "concat", lhs: dtype, rhs: s.dtype });
        }
    }
    if dtype.size_in_bytes() == 2 {
        let wide: Vec<GpuStorage> = parts.iter().map(|(s, l)| cast(s, l, DType::F32)).collect::<Result<_>>()?;
        let layouts: Vec<Layout> = parts.iter().map(|(_, l)| Layout::contiguous(l.shape())).collect();
        let pairs: Vec<(&GpuStorage, &Layout)> = wide.iter().zip(&layouts).collect();
        let joined = concat(&pairs, axis)?;
        let mut shape = l0.shape().to_vec();
        shape[axis] = parts.iter().map(|(_, l)| l.shape()[axis]).sum();
        return cast(&joined, &Layout::contiguous(&shape), dtype);
    }
    let inner: usize = l0.shape()[axis + 1..].iter().product();
    let outer: usize = l0.shape()[..axis].iter().product();
    let total: usize = parts.iter().map(|(_, l)| l.shape()[axis]).sum();
    let out = GpuStorage::alloc(&first.dev, dtype, outer * total * inner, "concat")?;
    let mut start = 0;
    for (s, l) in parts {
        let rows = l.shape()[axis] * inner;
        let n = l.numel();
        if n > 0 {
            let mut p = Params::new(&[n as u32, rows as u32, (total * inner) as u32, start as u32, 0]);
            let rec = p.layout(l)?;
            p.set(4, rec);
            first.dev.launch(&CONCAT, &p, &[out.buffer(), s.buffer()], first.dev.groups_1d(n.div_ceil(256)), Traffic::words(n, n))?;
        }
        start += rows;
    }
    Ok(out)
}
