//! Launcher of `shaders/binary.wgsl`: every [`BinaryOp`] over broadcast strided inputs, and
//! `where`.

use super::unary::cmp_code;
use super::{dtype_code, Access, GpuStorage, Kernel, Params, Traffic};
use crate::backend::BinaryOp;
use crate::error::{Error, Result};
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/binary.wgsl");
const BINARY: Kernel =
    Kernel { shader: "binary", source: SRC, entry: "binary", access: &[(1, Access::Write), (2, Access::Read), (3, Access::Read)] };
const WHERE: Kernel = Kernel {
    shader: "binary",
    source: SRC,
    entry: "where_select",
    access: &[(1, Access::Write), (2, Access::Read), (3, Access::Read), (4, Access::Read)],
};

pub(super) fn binary(a: &GpuStorage, op: BinaryOp, la: &Layout, b: &GpuStorage, lb: &Layout) -> Result<GpuStorage> {
    a.need_f32("binary")?;
    if b.dtype != a.dtype {
        return Err(Error::DTypeMismatch { op: "binary", lhs: a.dtype, rhs: b.dtype });
    }
    let n = la.numel();
    let out = GpuStorage::alloc(&a.dev, a.dtype, n, "binary")?;
    let (code, cmp) = match op {
        BinaryOp::Add => (0, 0),
        BinaryOp::Sub => (1, 0),
        BinaryOp::Mul => (2, 0),
        BinaryOp::Div => (3, 0),
        BinaryOp::Max => (4, 0),
        BinaryOp::Min => (5, 0),
        BinaryOp::Cmp(c) => (6, cmp_code(c)),
        BinaryOp::SiluBackward => (7, 0),
    };
    let mut p = Params::new(&[n as u32, code, cmp, 0, 0]);
    let ra = p.layout(la)?;
    let rb = p.layout(lb)?;
    p.set(3, ra);
    p.set(4, rb);
    a.dev.launch(&BINARY, &p, &[out.buffer(), a.buffer(), b.buffer()], a.dev.groups_1d(n.div_ceil(256)), Traffic::words(2 * n, n))?;
    Ok(out)
}

pub(super) fn where_cond(c: &GpuStorage, lc: &Layout, t: &GpuStorage, lt: &Layout, f: &GpuStorage, lf: &Layout) -> Result<GpuStorage> {
    t.need_f32("where")?;
    if f.dtype != t.dtype {
        return Err(Error::DTypeMismatch { op: "where", lhs: t.dtype, rhs: f.dtype });
    }
    let n = lt.numel();
    let out = GpuStorage::alloc(&t.dev, t.dtype, n, "where")?;
    let mut p = Params::new(&[n as u32, dtype_code(c.dtype), 0, 0, 0]);
    let (rc, rt, rf) = (p.layout(lc)?, p.layout(lt)?, p.layout(lf)?);
    p.set(2, rc);
    p.set(3, rt);
    p.set(4, rf);
    t.dev.launch(
        &WHERE,
        &p,
        &[out.buffer(), t.buffer(), f.buffer(), c.buffer()],
        t.dev.groups_1d(n.div_ceil(256)),
        Traffic::bytes(n * (8 + c.dtype.size_in_bytes()), 4 * n),
    )?;
    Ok(out)
}
