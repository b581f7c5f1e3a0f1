//! Launcher of `shaders/unary.wgsl`: every [`UnaryOp`] in one pipeline, the op a parameter.

use super::{fbits, Access, GpuStorage, Kernel, Params, Traffic};
use crate::backend::{CmpOp, UnaryOp};
use crate::error::Result;
use crate::layout::Layout;

const SRC: &str = include_str!("../../../shaders/unary.wgsl");
const UNARY: Kernel = Kernel { shader: "unary", source: SRC, entry: "unary", access: &[(1, Access::Write), (2, Access::Read)] };

pub(super) fn cmp_code(c: CmpOp) -> u32 {
    match c {
        CmpOp::Eq => 0,
        CmpOp::Ne => 1,
        CmpOp::Lt => 2,
        CmpOp::Le => 3,
        CmpOp::Gt => 4,
        CmpOp::Ge => 5,
    }
}

/// (op code, a, b, cmp) as the shader reads them.
fn code(op: UnaryOp) -> (u32, f64, f64, u32) {
    match op {
        UnaryOp::Neg => (0, 0.0, 0.0, 0),
        UnaryOp::Exp => (1, 0.0, 0.0, 0),
        UnaryOp::Log => (2, 0.0, 0.0, 0),
        UnaryOp::Sqrt => (3, 0.0, 0.0, 0),
        UnaryOp::Rsqrt => (4, 0.0, 0.0, 0),
        UnaryOp::Recip => (5, 0.0, 0.0, 0),
        UnaryOp::Sqr => (6, 0.0, 0.0, 0),
        UnaryOp::Abs => (7, 0.0, 0.0, 0),
        UnaryOp::Sign => (8, 0.0, 0.0, 0),
        UnaryOp::Tanh => (9, 0.0, 0.0, 0),
        UnaryOp::Sigmoid => (10, 0.0, 0.0, 0),
        UnaryOp::Erf => (11, 0.0, 0.0, 0),
        UnaryOp::Relu => (12, 0.0, 0.0, 0),
        UnaryOp::GeluErf => (13, 0.0, 0.0, 0),
        UnaryOp::GeluTanh => (14, 0.0, 0.0, 0),
        UnaryOp::Silu => (15, 0.0, 0.0, 0),
        UnaryOp::Powf(p) => (16, p, 0.0, 0),
        UnaryOp::Affine(a, b) => (17, a, b, 0),
        UnaryOp::Clamp(lo, hi) => (18, lo, hi, 0),
        UnaryOp::Cmp(c, v) => (19, v, 0.0, cmp_code(c)),
    }
}

pub(super) fn unary(x: &GpuStorage, op: UnaryOp, layout: &Layout) -> Result<GpuStorage> {
    x.need_f32("unary")?;
    let n = layout.numel();
    let out = GpuStorage::alloc(&x.dev, x.dtype, n, "unary")?;
    let (c, a, b, cmp) = code(op);
    let mut p = Params::new(&[n as u32, c, fbits(a), fbits(b), cmp, 0]);
    let rec = p.layout(layout)?;
    p.set(5, rec);
    x.dev.launch(&UNARY, &p, &[out.buffer(), x.buffer()], x.dev.groups_1d(n.div_ceil(256)), Traffic::words(n, n))?;
    Ok(out)
}
