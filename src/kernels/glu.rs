//! The gated activation of a gated MLP as one op: `y = act(g) ⊙ u`, with `g = x W_gateᵀ` and
//! `u = x W_upᵀ` (SwiGLU with `act` = SiLU in LLaMA, GeGLU with GELU-tanh in Gemma).
//!
//! # The math
//!
//! Forward, element-wise: `y = act(g) · u`. Backward, with `dy = ∂L/∂y`:
//!
//! ```text
//! du = act(g) · dy
//! dg = act'(g) · u · dy
//! SiLU:       act(x) = x σ(x)                     act'(x) = σ(x) (1 + x (1 − σ(x)))
//! GELU-tanh:  act(x) = ½ x (1 + t),  t = tanh(c (x + 0.044715 x³)),  c = √(2/π)
//!             act'(x) = ½ (1 + t) + ½ x (1 − t²) c (1 + 3·0.044715 x²)
//! ```
//!
//! The composition `act(g).mul(u)` reads and writes the `[tokens, intermediate]` tensors five
//! times forward (act: read g, write a; mul: read a and u, write y) and keeps `a` for
//! backward; its backward runs the activation's backward and the product's two gradients as
//! four more passes. Fused, the forward is one pass (read g, u; write y) that keeps nothing
//! new, and the backward one pass (read g, u, dy; write dg, du).
//!
//! CPU: [`glu_cpu`] / [`glu_backward_cpu`] over rayon chunks (f32 with the vectorisable
//! `exp_fast`, f64 exact). GPU: `shaders/glu.wgsl`, one element per invocation.
//! [`Tensor::glu`] is the op; [`Tensor::glu_reference`] the composition it is tested against.

use rayon::prelude::*;

use super::Family;
use crate::backend::gpu::{Access, Kernel, Params, Traffic};
use crate::backend::{CpuStorage, GpuStorage, Storage};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::tensor::Tensor;

/// The gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GluAct {
    /// `x σ(x)` (SwiGLU).
    Silu,
    /// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))` (GeGLU, Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl GluAct {
    fn code(self) -> u32 {
        match self {
            GluAct::Silu => 0,
            GluAct::GeluTanh => 1,
        }
    }
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // √(2/π)
const GELU_A: f64 = 0.044715;

/// `tanh z` from one `exp_fast` (vectorises; `1 − e^{−2|z|}` loses relative precision only
/// where `t` itself is tiny, which moves `½x(1 + t)` by far less than an ulp of the result).
#[inline(always)]
fn tanh_fast<T: Float>(z: T) -> T {
    let e = (T::from_f64(-2.0) * z.abs()).exp_fast();
    let t = (T::ONE - e) / (T::ONE + e);
    if z < T::ZERO {
        -t
    } else {
        t
    }
}

/// SiLU and its slope: `(x σ(x), σ(x)(1 + x(1 − σ(x))))`, σ from the exp of a non-positive
/// number only (stable on both tails).
#[inline(always)]
fn silu<T: Float>(x: T) -> (T, T) {
    let e = (-x.abs()).exp_fast();
    let p = T::ONE / (T::ONE + e);
    let s = if x >= T::ZERO { p } else { e * p };
    (x * s, s * (T::ONE + x * (T::ONE - s)))
}

/// GELU-tanh and its slope (see the module docs).
#[inline(always)]
fn gelu_tanh<T: Float>(x: T) -> (T, T) {
    let (half, c, a) = (T::from_f64(0.5), T::from_f64(GELU_C), T::from_f64(GELU_A));
    let x2 = x * x;
    let t = tanh_fast(c * x * (T::ONE + a * x2));
    let y = half * x * (T::ONE + t);
    (y, half * (T::ONE + t) + half * x * (T::ONE - t * t) * c * (T::ONE + T::from_f64(3.0) * a * x2))
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// `y = act(g) · u` (contiguous, same length).
pub fn glu_cpu<T: Float>(act: GluAct, g: &[T], u: &[T]) -> Vec<T> {
    // One loop per activation, so each is a monomorphic (vectorised) function.
    fn go<T: Float>(f: impl Fn(T) -> (T, T) + Sync + Copy, g: &[T], u: &[T]) -> Vec<T> {
        let mut y = vec![T::ZERO; g.len()];
        y.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
            crate::backend::cpu::with_avx2(
                #[inline(always)]
                || {
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = f(g).0 * u;
                    }
                },
            )
        });
        y
    }
    match act {
        GluAct::Silu => go(silu, g, u),
        GluAct::GeluTanh => go(gelu_tanh, g, u),
    }
}

/// `(dg, du)` of `y = act(g) · u` given `dy` (contiguous, same length).
pub fn glu_backward_cpu<T: Float>(act: GluAct, g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    fn go<T: Float>(f: impl Fn(T) -> (T, T) + Sync + Copy, g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let (mut dg, mut du) = (vec![T::ZERO; g.len()], vec![T::ZERO; g.len()]);
        let ins = g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK));
        dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).zip(ins).for_each(|((dg, du), ((g, u), dy))| {
            crate::backend::cpu::with_avx2(
                #[inline(always)]
                || {
                    for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
                        let (a, slope) = f(g);
                        *du = a * dy;
                        *dg = slope * u * dy;
                    }
                },
            )
        });
        (dg, du)
    }
    match act {
        GluAct::Silu => go(silu, g, u, dy),
        GluAct::GeluTanh => go(gelu_tanh, g, u, dy),
    }
}

const SRC: &str = include_str!("../../shaders/glu.wgsl");
const FORWARD: Kernel =
    Kernel { shader: "glu", source: SRC, entry: "glu", access: &[(1, Access::Write), (3, Access::Read), (4, Access::Read)] };
const BACKWARD: Kernel = Kernel {
    shader: "glu",
    source: SRC,
    entry: "glu_backward",
    access: &[(1, Access::Write), (2, Access::Write), (3, Access::Read), (4, Access::Read), (5, Access::Read)],
};

/// The family: forward (inputs g, u; output y) or backward (inputs g, u, dy; outputs dg, du).
struct Glu {
    act: GluAct,
    backward: bool,
}

fn contiguous_slice<'a, T: Float + crate::backend::cpu::FromStorage>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> Result<&'a [T]> {
    if !l.is_contiguous() {
        return Err(Error::InvalidArgument { op, msg: format!("contiguous operands expected, got strides {:?}", l.strides()) });
    }
    Ok(&T::slice(s, op)?[l.offset()..l.offset() + l.numel()])
}

impl Family for Glu {
    fn name(&self) -> &'static str {
        if self.backward {
            "glu_backward"
        } else {
            "glu"
        }
    }

    fn cpu(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<CpuStorage>> {
        let op = self.name();
        macro_rules! go {
            ($t:ty, $wrap:path) => {{
                let s = |i: usize| contiguous_slice::<$t>(inputs[i].0, inputs[i].1, op);
                if self.backward {
                    let (dg, du) = glu_backward_cpu(self.act, s(0)?, s(1)?, s(2)?);
                    Ok(vec![$wrap(dg), $wrap(du)])
                } else {
                    Ok(vec![$wrap(glu_cpu(self.act, s(0)?, s(1)?))])
                }
            }};
        }
        match inputs[0].0 {
            CpuStorage::F32(_) => go!(f32, CpuStorage::F32),
            CpuStorage::F64(_) => go!(f64, CpuStorage::F64),
            other => Err(Error::DType { op, expected: "f32 or f64", got: other.dtype() }),
        }
    }

    fn gpu(&self, inputs: &[(&GpuStorage, &Layout)]) -> Result<Vec<GpuStorage>> {
        let op = self.name();
        for (s, l) in inputs {
            s.need_f32(op)?;
            if !l.is_contiguous() {
                return Err(Error::InvalidArgument { op, msg: format!("contiguous operands expected, got strides {:?}", l.strides()) });
            }
        }
        let (g, lg) = inputs[0];
        let n = lg.numel();
        let dev = g.device();
        let outs = (0..if self.backward { 2 } else { 1 }).map(|_| GpuStorage::alloc(dev, g.dtype(), n, op)).collect::<Result<Vec<_>>>()?;
        if n == 0 {
            return Ok(outs);
        }
        // Offsets of the inputs (in elements), so views into larger buffers are read in place.
        let offs: Vec<u32> = inputs.iter().map(|(_, l)| l.offset() as u32).collect();
        let mut words = vec![n as u32, self.act.code()];
        words.extend(&offs);
        words.resize(5, 0);
        let p = Params::new(&words);
        let mut bufs: Vec<_> = outs.iter().map(|o| o.buffer()).collect();
        bufs.extend(inputs.iter().map(|(s, _)| s.buffer()));
        let (kernel, traffic) =
            if self.backward { (&BACKWARD, Traffic::words(3 * n, 2 * n)) } else { (&FORWARD, Traffic::words(2 * n, n)) };
        dev.launch(kernel, &p, &bufs, dev.groups_1d(n.div_ceil(256)), traffic)?;
        Ok(outs)
    }
}

impl Tensor {
    /// `act(self) ⊙ up` in one op (`self` the gate; same shape, dtype and device), with a
    /// one-pass backward; see the module docs.
    pub fn glu(&self, up: &Tensor, act: GluAct) -> Result<Tensor> {
        const OP: &str = "glu";
        if self.shape() != up.shape() {
            return Err(Error::Shape { op: OP, msg: format!("gate {:?} and up {:?} differ", self.shape(), up.shape()) });
        }
        if self.dtype() != up.dtype() {
            return Err(Error::DTypeMismatch { op: OP, lhs: self.dtype(), rhs: up.dtype() });
        }
        let (g, u) = (self.contiguous()?, up.contiguous()?);
        let y = super::run(&Glu { act, backward: false }, &[(&g.storage_arc(), g.layout()), (&u.storage_arc(), u.layout())])?;
        let y = one(y)?;
        let (gd, ud) = (g.detach(), u.detach());
        Ok(Tensor::from_op(y, self.shape(), OP, &[&g, &u], move |dy| {
            let dy = dy.contiguous()?;
            let mut out = super::run(
                &Glu { act, backward: true },
                &[(&gd.storage_arc(), gd.layout()), (&ud.storage_arc(), ud.layout()), (&dy.storage_arc(), dy.layout())],
            )?;
            let du = out.pop().map(|s| Tensor::from_storage(s, gd.shape()));
            let dg = out.pop().map(|s| Tensor::from_storage(s, gd.shape()));
            Ok(vec![dg, du])
        }))
    }

    /// The composition [`Tensor::glu`] is tested against: `act(self).mul(up)`.
    pub fn glu_reference(&self, up: &Tensor, act: GluAct) -> Result<Tensor> {
        let a = match act {
            GluAct::Silu => self.silu()?,
            GluAct::GeluTanh => self.gelu_tanh()?,
        };
        a.mul(up)
    }
}

fn one(mut v: Vec<Storage>) -> Result<Storage> {
    v.pop().ok_or_else(|| Error::InvalidArgument { op: "glu", msg: "the kernel returned no output".into() })
}
