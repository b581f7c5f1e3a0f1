//! The backend boundary: the small set of primitive kernels every device implements.
//!
//! The tensor layer (`crate::tensor`) does shapes, broadcasting and autograd; it calls only
//! the methods of [`Storage`] below. A storage is a flat buffer on one device; every kernel
//! reads its inputs through a [`Layout`] (so transposed, narrowed and broadcast views are read
//! in place) and writes a fresh contiguous output. Adding a device means adding a variant to
//! [`Storage`] and [`Device`] and implementing these primitives for it.

pub mod cpu;
pub mod gpu;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
pub use cpu::CpuStorage;

/// The widest attention head the GPU's fused attention kernel takes.
pub fn gpu_attention_max_head_dim() -> usize {
    gpu::ATTENTION_MAX_HEAD_DIM
}
pub use gpu::{GpuDevice, GpuStorage, MemoryStats};

/// Where a tensor's storage lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// Host memory, kernels on rayon.
    Cpu,
    /// A GPU through wgpu (Vulkan, Metal or DX12), kernels in WGSL.
    Gpu(GpuDevice),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Gpu(g) => write!(f, "{g}"),
        }
    }
}

impl Device {
    /// The hardware GPU (the process-wide shared one); an error when there is none. Software
    /// adapters (lavapipe, llvmpipe) are never picked here: they are slower than the CPU backend.
    pub fn gpu() -> Result<Device> {
        Ok(Device::Gpu(GpuDevice::shared(gpu::AdapterKind::Hardware)?))
    }

    /// A software GPU adapter (Mesa's lavapipe/llvmpipe), used only when asked for by name: the
    /// GPU code path on a machine without a GPU (CI, tests).
    pub fn gpu_software() -> Result<Device> {
        Ok(Device::Gpu(GpuDevice::shared(gpu::AdapterKind::Software)?))
    }

    /// A hardware GPU when there is one, else the CPU (saying so once on stderr).
    pub fn auto() -> Device {
        Device::gpu().unwrap_or_else(|e| {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| crate::say!("tinytune: device auto = cpu ({e})"));
            Device::Cpu
        })
    }

    /// `"auto"`, `"cpu"`, `"gpu"` or `"gpu-software"` (as accepted by `--device` and
    /// `TINYTUNE_DEVICE`).
    pub fn from_name(name: &str) -> Result<Device> {
        match name.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Device::auto()),
            "cpu" => Ok(Device::Cpu),
            "gpu" => Device::gpu(),
            "gpu-software" | "software" | "gpu_software" => Device::gpu_software(),
            other => Err(Error::InvalidArgument {
                op: "device",
                msg: format!("unknown device {other:?}; expected auto, cpu, gpu or gpu-software"),
            }),
        }
    }

    /// The device named by the environment variable `TINYTUNE_DEVICE` (default `auto`).
    pub fn from_env() -> Result<Device> {
        Device::from_name(&std::env::var("TINYTUNE_DEVICE").unwrap_or_else(|_| "auto".into()))
    }

    /// Whether this is a GPU device.
    pub fn is_gpu(&self) -> bool {
        matches!(self, Device::Gpu(_))
    }

    /// Bytes held on the device (GPU only; `None` for the CPU).
    pub fn memory_stats(&self) -> Option<MemoryStats> {
        match self {
            Device::Cpu => None,
            Device::Gpu(g) => Some(g.memory_stats()),
        }
    }

    /// Wait until every operation recorded on the device has finished (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Gpu(g) => g.synchronize(),
        }
    }
}

/// Comparison used by [`UnaryOp::Cmp`] and [`BinaryOp::Cmp`]; the result is 1.0 or 0.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Element-wise functions of one tensor (plus scalar parameters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Sqr,
    Abs,
    Sign,
    Tanh,
    Sigmoid,
    Erf,
    Relu,
    /// `x Φ(x) = x/2 (1 + erf(x/√2))`
    GeluErf,
    /// `x/2 (1 + tanh(√(2/π)(x + 0.044715 x³)))`
    GeluTanh,
    /// `x σ(x)`
    Silu,
    /// `x^p`
    Powf(f64),
    /// `a·x + b`
    Affine(f64, f64),
    /// `min(max(x, lo), hi)`
    Clamp(f64, f64),
    /// `x ∘ c` as 1.0/0.0
    Cmp(CmpOp, f64),
}

impl UnaryOp {
    /// The kernel's name in the profile.
    pub fn kernel(&self) -> &'static str {
        match self {
            UnaryOp::Neg => "unary:neg",
            UnaryOp::Exp => "unary:exp",
            UnaryOp::Log => "unary:log",
            UnaryOp::Sqrt => "unary:sqrt",
            UnaryOp::Rsqrt => "unary:rsqrt",
            UnaryOp::Recip => "unary:recip",
            UnaryOp::Sqr => "unary:sqr",
            UnaryOp::Abs => "unary:abs",
            UnaryOp::Sign => "unary:sign",
            UnaryOp::Tanh => "unary:tanh",
            UnaryOp::Sigmoid => "unary:sigmoid",
            UnaryOp::Erf => "unary:erf",
            UnaryOp::Relu => "unary:relu",
            UnaryOp::GeluErf => "unary:gelu",
            UnaryOp::GeluTanh => "unary:gelu_tanh",
            UnaryOp::Silu => "unary:silu",
            UnaryOp::Powf(_) => "unary:powf",
            UnaryOp::Affine(..) => "unary:affine",
            UnaryOp::Clamp(..) => "unary:clamp",
            UnaryOp::Cmp(..) => "unary:cmp",
        }
    }
}

/// Element-wise functions of two tensors of the same (already broadcast) shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Cmp(CmpOp),
    /// `b · σ(a)(1 + a(1 − σ(a)))`: the gradient `b` of SiLU's output taken back to its input
    /// `a`, in one pass instead of six (SiLU's backward rule).
    SiluBackward,
}

impl BinaryOp {
    /// The kernel's name in the profile.
    pub fn kernel(&self) -> &'static str {
        match self {
            BinaryOp::Add => "binary:add",
            BinaryOp::Sub => "binary:sub",
            BinaryOp::Mul => "binary:mul",
            BinaryOp::Div => "binary:div",
            BinaryOp::Max => "binary:max",
            BinaryOp::Min => "binary:min",
            BinaryOp::Cmp(_) => "binary:cmp",
            BinaryOp::SiluBackward => "binary:silu_backward",
        }
    }
}

/// Reductions along one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
    /// Index of the first maximum, as U32.
    ArgMax,
    /// Index of the first minimum, as U32.
    ArgMin,
}

impl ReduceOp {
    /// The kernel's name in the profile.
    pub fn kernel(&self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce:sum",
            ReduceOp::Max => "reduce:max",
            ReduceOp::Min => "reduce:min",
            ReduceOp::ArgMax => "reduce:argmax",
            ReduceOp::ArgMin => "reduce:argmin",
        }
    }
}

/// Hyper-parameters of one AdamW step (decoupled weight decay, as PyTorch's `AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The step number, from 1 (for the bias corrections).
    pub step: u64,
}

impl AdamWStep {
    /// `(lr / (1 − β1ᵗ), √(1 − β2ᵗ))`: the bias corrections folded into two scalars.
    pub fn corrections(&self) -> (f64, f64) {
        let t = self.step.max(1) as i32;
        (self.lr / (1.0 - self.beta1.powi(t)), (1.0 - self.beta2.powi(t)).sqrt())
    }
}

/// The CPU reference of [`Storage::adamw_step`] on contiguous slices (element-wise, so split
/// across threads in fixed chunks: the same bits whatever the thread count).
fn adamw_cpu<T: crate::dtype::Float>(p: &[T], g: &[T], m: &[T], v: &[T], h: &AdamWStep) -> (Vec<T>, Vec<T>, Vec<T>) {
    use rayon::prelude::*;
    let c = T::from_f64;
    let (step_size, bc2_sqrt) = h.corrections();
    let (b1, b2, eps, decay) = (c(h.beta1), c(h.beta2), c(h.eps), c(1.0 - h.lr * h.weight_decay));
    let (one, ss, bc) = (T::ONE, c(step_size), c(bc2_sqrt));
    let n = p.len();
    let (mut po, mut mo, mut vo) = (vec![T::ZERO; n], vec![T::ZERO; n], vec![T::ZERO; n]);
    const CHUNK: usize = 1 << 14;
    po.par_chunks_mut(CHUNK).zip(mo.par_chunks_mut(CHUNK)).zip(vo.par_chunks_mut(CHUNK)).enumerate().for_each(|(k, ((po, mo), vo))| {
        let base = k * CHUNK;
        for j in 0..po.len() {
            let i = base + j;
            let mi = b1 * m[i] + (one - b1) * g[i];
            let vi = b2 * v[i] + (one - b2) * g[i] * g[i];
            po[j] = p[i] * decay - ss * mi / (vi.sqrt() / bc + eps);
            mo[j] = mi;
            vo[j] = vi;
        }
    });
    (po, mo, vo)
}

/// Bytes of a kernel's output, for the profile.
trait OutBytes {
    fn out_bytes(&self) -> usize;
}

impl OutBytes for Storage {
    fn out_bytes(&self) -> usize {
        self.len() * self.dtype().size_in_bytes()
    }
}

impl OutBytes for CpuStorage {
    fn out_bytes(&self) -> usize {
        self.len() * self.dtype().size_in_bytes()
    }
}

impl<A: OutBytes> OutBytes for Option<A> {
    fn out_bytes(&self) -> usize {
        self.as_ref().map_or(0, OutBytes::out_bytes)
    }
}

impl<A: OutBytes, B: OutBytes> OutBytes for (A, B) {
    fn out_bytes(&self) -> usize {
        self.0.out_bytes() + self.1.out_bytes()
    }
}

impl<A: OutBytes, B: OutBytes, C: OutBytes> OutBytes for (A, B, C) {
    fn out_bytes(&self) -> usize {
        self.0.out_bytes() + self.1.out_bytes() + self.2.out_bytes()
    }
}

/// Run one primitive under the profile (`crate::profile`): its time, `flops` and output bytes
/// are recorded under `kernel`.
#[inline]
fn profiled<T: OutBytes>(kernel: &'static str, flops: f64, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let prof = crate::profile::span(kernel, flops);
    let out = f();
    prof.done(out.as_ref().map_or(0, OutBytes::out_bytes));
    out
}

/// `2·m·n·k` per batch of a matmul `[.., m, k] · [.., k, n]`.
fn matmul_flops(a: &Layout, b: &Layout) -> f64 {
    let (sa, sb) = (a.shape(), b.shape());
    if sa.len() < 2 || sb.len() < 2 {
        return 0.0;
    }
    let batch: usize = sa[..sa.len() - 2].iter().product();
    2.0 * (batch * sa[sa.len() - 2] * sa[sa.len() - 1] * sb[sb.len() - 1]) as f64
}

/// The LoRA linear's `x wᵀ` (`2nkm`), `xd aᵀ` (`2nkr`) and `u bᵀ` (`2nrm`).
fn lora_flops(x: &Layout, w: &Layout, a: &Layout) -> f64 {
    match (x.shape(), w.shape(), a.shape()) {
        ([n, k], [m, _], [r, _]) => 2.0 * (n * k * m + n * k * r + n * r * m) as f64,
        _ => 0.0,
    }
}

/// A flat buffer on one device.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Gpu(GpuStorage),
}

fn mismatch(op: &'static str, a: &Storage, b: &Storage) -> Error {
    Error::DeviceMismatch { op, lhs: a.device().to_string(), rhs: b.device().to_string() }
}

impl Storage {
    /// This operand as a host buffer, or a device-mismatch error against `first`.
    fn cpu<'a>(&'a self, op: &'static str, first: &Storage) -> Result<&'a CpuStorage> {
        match self {
            Storage::Cpu(s) => Ok(s),
            _ => Err(mismatch(op, first, self)),
        }
    }

    /// This operand as a GPU buffer on the same GPU as `first`, or a device-mismatch error.
    fn gpu<'a>(&'a self, op: &'static str, first: &Storage) -> Result<&'a GpuStorage> {
        match (self, first) {
            (Storage::Gpu(s), Storage::Gpu(f)) if s.device() == f.device() => Ok(s),
            _ => Err(mismatch(op, first, self)),
        }
    }

    fn opt_cpu<'a>(s: Option<&'a Storage>, op: &'static str, first: &Storage) -> Result<Option<&'a CpuStorage>> {
        s.map(|s| s.cpu(op, first)).transpose()
    }

    fn opt_gpu<'a>(s: Option<&'a Storage>, op: &'static str, first: &Storage) -> Result<Option<&'a GpuStorage>> {
        s.map(|s| s.gpu(op, first)).transpose()
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Gpu(s) => s.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Gpu(s) => Device::Gpu(s.device().clone()),
        }
    }

    /// Number of elements in the buffer.
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            Storage::Gpu(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All-zero buffer of `n` elements on `device`.
    pub fn zeros(device: &Device, dtype: DType, n: usize) -> Result<Storage> {
        profiled("fill", 0.0, || match device {
            Device::Cpu => Ok(Storage::Cpu(CpuStorage::zeros(dtype, n))),
            Device::Gpu(g) => GpuStorage::full(g, dtype, n, 0.0).map(Storage::Gpu),
        })
    }

    /// Buffer of `n` copies of `v` (converted to `dtype`).
    pub fn full(device: &Device, dtype: DType, n: usize, v: f64) -> Result<Storage> {
        profiled("fill", 0.0, || -> Result<Storage> {
            match device {
                Device::Cpu => Ok(Storage::Cpu(CpuStorage::full(dtype, n, v))),
                Device::Gpu(g) => Ok(Storage::Gpu(GpuStorage::full(g, dtype, n, v)?)),
            }
        })
    }

    /// Upload host data.
    pub fn from_cpu(device: &Device, data: CpuStorage) -> Result<Storage> {
        profiled("upload", 0.0, || -> Result<Storage> {
            match device {
                Device::Cpu => Ok(Storage::Cpu(data)),
                Device::Gpu(g) => Ok(Storage::Gpu(GpuStorage::from_cpu(g, &data)?)),
            }
        })
    }

    /// Copy the elements selected by `layout` to host memory, contiguous, in row-major order.
    pub fn to_cpu(&self, layout: &Layout) -> Result<CpuStorage> {
        profiled("to_cpu", 0.0, || -> Result<CpuStorage> {
            match self {
                Storage::Cpu(s) => s.copy_strided(layout),
                Storage::Gpu(s) => s.to_cpu(layout),
            }
        })
    }

    /// Copy into a contiguous buffer of dtype `dtype` (a plain copy when the dtype is the same).
    pub fn cast(&self, layout: &Layout, dtype: DType) -> Result<Storage> {
        profiled(if self.dtype() == dtype { "copy" } else { "cast" }, 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.cast(layout, dtype)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.cast(layout, dtype)?)),
            }
        })
    }

    pub fn unary(&self, op: UnaryOp, layout: &Layout) -> Result<Storage> {
        profiled(op.kernel(), 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.unary(op, layout)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.unary(op, layout)?)),
            }
        })
    }

    /// `self` and `rhs` are read through layouts of the same shape (broadcast already applied).
    pub fn binary(&self, op: BinaryOp, layout: &Layout, rhs: &Storage, rhs_layout: &Layout) -> Result<Storage> {
        profiled(op.kernel(), 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.binary(op, layout, rhs.cpu("binary", self)?, rhs_layout)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.binary(op, layout, rhs.gpu("binary", self)?, rhs_layout)?)),
            }
        })
    }

    /// `cond ? t : f` element-wise; `self` is the condition (non-zero = true); same shapes.
    pub fn where_cond(&self, layout: &Layout, t: &Storage, t_layout: &Layout, f: &Storage, f_layout: &Layout) -> Result<Storage> {
        profiled("where", 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => {
                    Ok(Storage::Cpu(s.where_cond(layout, t.cpu("where", self)?, t_layout, f.cpu("where", self)?, f_layout)?))
                }
                Storage::Gpu(s) => {
                    Ok(Storage::Gpu(s.where_cond(layout, t.gpu("where", self)?, t_layout, f.gpu("where", self)?, f_layout)?))
                }
            }
        })
    }

    /// Reduce along `axis`; the output has the input's shape with that axis removed.
    pub fn reduce(&self, op: ReduceOp, layout: &Layout, axis: usize) -> Result<Storage> {
        profiled(op.kernel(), 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.reduce(op, layout, axis)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.reduce(op, layout, axis)?)),
            }
        })
    }

    /// Batched matrix product. Both layouts have rank ≥ 2 and identical batch dims (broadcast
    /// already applied): `[.., m, k] · [.., k, n] → [.., m, n]`, transposes read in place.
    /// On the GPU, `rhs` may also be f16/bf16 storage with an f32 `self` (a frozen weight,
    /// dequantised inside the kernel, accumulated in f32).
    pub fn matmul(&self, layout: &Layout, rhs: &Storage, rhs_layout: &Layout) -> Result<Storage> {
        profiled("matmul", matmul_flops(layout, rhs_layout), || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.matmul(layout, rhs.cpu("matmul", self)?, rhs_layout)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.matmul(layout, rhs.gpu("matmul", self)?, rhs_layout)?)),
            }
        })
    }

    /// The LoRA linear map on rank-2 operands read through their layouts:
    /// `x [n, k]`, `w [m, k]`, `xd [n, k]`, `a [r, k]`, `b [m, r]`; returns
    /// `(y, u)` with `u = xd aᵀ` (`[n, r]`) and `y = x wᵀ + s·u bᵀ` (`[n, m]`), both contiguous.
    /// `w` may be f16/bf16 storage beside f32 operands (a frozen base weight).
    ///
    /// The CPU runs `x wᵀ`, the small `u`, and accumulates `(s·u) bᵀ` into the first product
    /// (no temporary of `y`'s size); the GPU runs one fused kernel after the small `u` matmul (`shaders/lora.wgsl`). The same
    /// primitive gives the input gradient `dx = g W0 + s·(g B) A` with `x = xd = g`, `w = W0ᵀ`,
    /// `a = Bᵀ`, `b = Aᵀ` (transposed layouts), returning `g B` as `u`.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_linear(
        &self,
        layout: &Layout,
        w: &Storage,
        w_layout: &Layout,
        xd: &Storage,
        xd_layout: &Layout,
        a: &Storage,
        a_layout: &Layout,
        b: &Storage,
        b_layout: &Layout,
        scale: f64,
    ) -> Result<(Storage, Storage)> {
        profiled("lora_linear", lora_flops(layout, w_layout, a_layout), || -> Result<(Storage, Storage)> {
            const OP: &str = "lora_linear";
            for (l, what) in [(layout, "x"), (w_layout, "w"), (xd_layout, "xd"), (a_layout, "a"), (b_layout, "b")] {
                if l.rank() != 2 {
                    return Err(Error::Shape { op: OP, msg: format!("{what} must be a matrix, got shape {:?}", l.shape()) });
                }
            }
            let (n, k, m, r) = (layout.shape()[0], layout.shape()[1], w_layout.shape()[0], a_layout.shape()[0]);
            let ok = w_layout.shape() == [m, k] && xd_layout.shape() == [n, k] && a_layout.shape() == [r, k] && b_layout.shape() == [m, r];
            if !ok {
                return Err(Error::Shape {
                    op: OP,
                    msg: format!(
                        "need x [n, k], w [m, k], xd [n, k], a [r, k], b [m, r]; got x {:?}, w {:?}, xd {:?}, a {:?}, b {:?}",
                        layout.shape(),
                        w_layout.shape(),
                        xd_layout.shape(),
                        a_layout.shape(),
                        b_layout.shape()
                    ),
                });
            }
            match self {
                Storage::Cpu(x) => {
                    // A 16-bit or quantised base weight is decoded as the product packs it.
                    let (w, xd, a, b) = (w.cpu(OP, self)?, xd.cpu(OP, self)?, a.cpu(OP, self)?, b.cpu(OP, self)?);
                    let (y, u) = x.lora_linear(layout, w, w_layout, xd, xd_layout, a, a_layout, b, b_layout, scale)?;
                    Ok((Storage::Cpu(y), Storage::Cpu(u)))
                }
                Storage::Gpu(x) => {
                    let (w, xd, a, b) = (w.gpu(OP, self)?, xd.gpu(OP, self)?, a.gpu(OP, self)?, b.gpu(OP, self)?);
                    let (y, u) = x.lora_linear(layout, w, w_layout, xd, xd_layout, a, a_layout, b, b_layout, scale)?;
                    Ok((Storage::Gpu(y), Storage::Gpu(u)))
                }
            }
        })
    }

    /// The gated product `c = ((a ⊙ gc) b + bias) ⊙ gr` on `a [m, k]` and `b [k, n]` read
    /// through their layouts (`b` may be f16/bf16 storage beside an f32 `a`, a frozen weight;
    /// quantised on the CPU), with `gc [k]`, `bias [n]`, `gr [n]` contiguous vectors, each
    /// optional; returns `(c, pre)`, `pre = (a ⊙ gc) b + bias` only when `keep_pre`.
    ///
    /// FineGates' linear and its input gradient (`tensor/gated.rs`). The GPU runs one kernel,
    /// the gates in its prologue and epilogue (`shaders/gated.wgsl`); the CPU, the reference,
    /// scales `a` by `gc` into a copy, multiplies, and applies the bias and `gr` in one pass
    /// over the product.
    #[allow(clippy::too_many_arguments)]
    pub fn gated_matmul(
        &self,
        layout: &Layout,
        b: &Storage,
        b_layout: &Layout,
        gc: Option<&Storage>,
        bias: Option<&Storage>,
        gr: Option<&Storage>,
        keep_pre: bool,
    ) -> Result<(Storage, Option<Storage>)> {
        const OP: &str = "gated_matmul";
        let flops = match (layout.shape(), b_layout.shape()) {
            ([m, k], [_, n]) => 2.0 * (m * k * n) as f64,
            _ => 0.0,
        };
        profiled(OP, flops, || -> Result<(Storage, Option<Storage>)> {
            let (m, k) = match layout.shape() {
                [m, k] => (*m, *k),
                s => return Err(Error::Shape { op: OP, msg: format!("a must be a matrix, got shape {s:?}") }),
            };
            let n = match b_layout.shape() {
                [kb, n] if *kb == k => *n,
                s => return Err(Error::Shape { op: OP, msg: format!("b must be [{k}, n] for a [{m}, {k}], got {s:?}") }),
            };
            for (v, len, what) in [(gc, k, "gc"), (bias, n, "bias"), (gr, n, "gr")] {
                if let Some(v) = v {
                    if v.len() < len {
                        return Err(Error::Shape { op: OP, msg: format!("{what} must hold {len} values, got {}", v.len()) });
                    }
                }
            }
            match self {
                Storage::Cpu(a) => {
                    let (gc, bias, gr) = (Self::opt_cpu(gc, OP, self)?, Self::opt_cpu(bias, OP, self)?, Self::opt_cpu(gr, OP, self)?);
                    let b = b.cpu(OP, self)?;
                    let (c, pre) = a.gated_matmul(layout, b, b_layout, gc, bias, gr, keep_pre)?;
                    Ok((Storage::Cpu(c), pre.map(Storage::Cpu)))
                }
                Storage::Gpu(a) => {
                    let (gc, bias, gr) = (Self::opt_gpu(gc, OP, self)?, Self::opt_gpu(bias, OP, self)?, Self::opt_gpu(gr, OP, self)?);
                    let b = b.gpu(OP, self)?;
                    let (c, pre) = a.gated_matmul(layout, b, b_layout, gc, bias, gr, keep_pre)?;
                    Ok((Storage::Gpu(c), pre.map(Storage::Gpu)))
                }
            }
        })
    }

    /// Softmax (or log-softmax) along the last axis.
    pub fn softmax_last(&self, layout: &Layout, log: bool) -> Result<Storage> {
        profiled("softmax", 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.softmax_last(layout, log)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.softmax_last(layout, log)?)),
            }
        })
    }

    /// Layer norm (or RMS norm) over the last axis of `x`, with optional affine weight and
    /// bias of the last axis' length. Returns `(y, mean, rstd)`, mean and rstd per row (mean is
    /// all zeros for RMS norm).
    pub fn norm_last(
        &self,
        layout: &Layout,
        weight: Option<&Storage>,
        bias: Option<&Storage>,
        eps: f64,
        rms: bool,
    ) -> Result<(Storage, Storage, Storage)> {
        profiled("norm", 0.0, || -> Result<(Storage, Storage, Storage)> {
            match self {
                Storage::Cpu(s) => {
                    let (w, b) = (Self::opt_cpu(weight, "norm", self)?, Self::opt_cpu(bias, "norm", self)?);
                    let (y, m, r) = s.norm_last(layout, w, b, eps, rms)?;
                    Ok((Storage::Cpu(y), Storage::Cpu(m), Storage::Cpu(r)))
                }
                Storage::Gpu(s) => {
                    let (w, b) = (Self::opt_gpu(weight, "norm", self)?, Self::opt_gpu(bias, "norm", self)?);
                    let (y, m, r) = s.norm_last(layout, w, b, eps, rms)?;
                    Ok((Storage::Gpu(y), Storage::Gpu(m), Storage::Gpu(r)))
                }
            }
        })
    }

    /// Backward of [`Storage::norm_last`]: from `x`, weight, the output gradient `g` and the saved
    /// `mean`/`rstd`, compute `(dx, dweight, dbias)`; dweight/dbias are summed over rows.
    #[allow(clippy::too_many_arguments)]
    pub fn norm_last_backward(
        &self,
        layout: &Layout,
        weight: Option<&Storage>,
        g: &Storage,
        g_layout: &Layout,
        mean: &Storage,
        rstd: &Storage,
        rms: bool,
    ) -> Result<(Storage, Storage, Storage)> {
        profiled("norm_backward", 0.0, || -> Result<(Storage, Storage, Storage)> {
            const OP: &str = "norm_backward";
            match self {
                Storage::Cpu(s) => {
                    let w = Self::opt_cpu(weight, OP, self)?;
                    let (dx, dw, db) =
                        s.norm_last_backward(layout, w, g.cpu(OP, self)?, g_layout, mean.cpu(OP, self)?, rstd.cpu(OP, self)?, rms)?;
                    Ok((Storage::Cpu(dx), Storage::Cpu(dw), Storage::Cpu(db)))
                }
                Storage::Gpu(s) => {
                    let w = Self::opt_gpu(weight, OP, self)?;
                    let (dx, dw, db) =
                        s.norm_last_backward(layout, w, g.gpu(OP, self)?, g_layout, mean.gpu(OP, self)?, rstd.gpu(OP, self)?, rms)?;
                    Ok((Storage::Gpu(dx), Storage::Gpu(dw), Storage::Gpu(db)))
                }
            }
        })
    }

    /// Fused attention forward (see [`cpu::attention`], `shaders/attention.wgsl`): `(O,
    /// log-sum-exp)`. On the GPU, q, k, v must be contiguous and `keep` is the spec's padding
    /// mask as an f32 buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention(
        &self,
        lq: &Layout,
        k: &Storage,
        lk: &Layout,
        v: &Storage,
        lv: &Layout,
        keep: Option<&Storage>,
        dims: cpu::attention::Dims,
        spec: &cpu::attention::AttnSpec,
    ) -> Result<(Storage, Storage)> {
        const OP: &str = "flash_attention";
        let flops = dims.product_flops(spec.causal);
        profiled(OP, flops, || -> Result<(Storage, Storage)> {
            match self {
                Storage::Cpu(s) => {
                    let (o, l) = s.flash_attention(lq, k.cpu(OP, self)?, lk, v.cpu(OP, self)?, lv, dims, spec)?;
                    Ok((Storage::Cpu(o), Storage::Cpu(l)))
                }
                Storage::Gpu(s) => {
                    let keep = Self::opt_gpu(keep, OP, self)?;
                    let (o, l) = s.flash_attention(k.gpu(OP, self)?, v.gpu(OP, self)?, keep, dims, spec)?;
                    Ok((Storage::Gpu(o), Storage::Gpu(l)))
                }
            }
        })
    }

    /// Fused attention backward: `(dQ, dK, dV)`.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_backward(
        &self,
        lq: &Layout,
        k: &Storage,
        lk: &Layout,
        v: &Storage,
        lv: &Layout,
        o: &Storage,
        lse: &Storage,
        go: &Storage,
        lgo: &Layout,
        keep: Option<&Storage>,
        dims: cpu::attention::Dims,
        spec: &cpu::attention::AttnSpec,
    ) -> Result<(Storage, Storage, Storage)> {
        const OP: &str = "flash_attention_backward";
        // Four products (S recomputed, dP, dQ, dK) against the forward's two, and dV: ~2x.
        let flops = 2.0 * dims.product_flops(spec.causal);
        profiled(OP, flops, || -> Result<(Storage, Storage, Storage)> {
            match self {
                Storage::Cpu(s) => {
                    let (dq, dk, dv) = s.flash_attention_backward(
                        lq,
                        k.cpu(OP, self)?,
                        lk,
                        v.cpu(OP, self)?,
                        lv,
                        o.cpu(OP, self)?,
                        lse.cpu(OP, self)?,
                        go.cpu(OP, self)?,
                        lgo,
                        dims,
                        spec,
                    )?;
                    Ok((Storage::Cpu(dq), Storage::Cpu(dk), Storage::Cpu(dv)))
                }
                Storage::Gpu(s) => {
                    let keep = Self::opt_gpu(keep, OP, self)?;
                    let (dq, dk, dv) = s.flash_attention_backward(
                        k.gpu(OP, self)?,
                        v.gpu(OP, self)?,
                        o.gpu(OP, self)?,
                        lse.gpu(OP, self)?,
                        go.gpu(OP, self)?,
                        keep,
                        dims,
                        spec,
                    )?;
                    Ok((Storage::Gpu(dq), Storage::Gpu(dk), Storage::Gpu(dv)))
                }
            }
        })
    }

    /// `out[.., j, ..] = self[.., idx[j], ..]` along `axis`; `idx` is a contiguous U32/I32 list.
    pub fn index_select(&self, layout: &Layout, axis: usize, idx: &Storage, idx_layout: &Layout) -> Result<Storage> {
        profiled("index_select", 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.index_select(layout, axis, idx.cpu("index_select", self)?, idx_layout)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.index_select(layout, axis, idx.gpu("index_select", self)?, idx_layout)?)),
            }
        })
    }

    /// Adjoint of index_select: a zero tensor of `shape` with `self[.., j, ..]` added into row
    /// `idx[j]` of `axis` (duplicate indices accumulate).
    pub fn index_add(&self, layout: &Layout, shape: &[usize], axis: usize, idx: &Storage, idx_layout: &Layout) -> Result<Storage> {
        profiled("index_add", 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.index_add(layout, shape, axis, idx.cpu("index_add", self)?, idx_layout)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.index_add(layout, shape, axis, idx.gpu("index_add", self)?, idx_layout)?)),
            }
        })
    }

    /// `out[i..] = self[i with i_axis replaced by idx[i..]]`; idx has the output's shape.
    pub fn gather(&self, layout: &Layout, axis: usize, idx: &Storage, idx_layout: &Layout) -> Result<Storage> {
        profiled("gather", 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.gather(layout, axis, idx.cpu("gather", self)?, idx_layout)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.gather(layout, axis, idx.gpu("gather", self)?, idx_layout)?)),
            }
        })
    }

    /// Adjoint of gather: zeros of `shape`, then `out[i with i_axis = idx[i]] += self[i]`.
    pub fn scatter_add(&self, layout: &Layout, shape: &[usize], axis: usize, idx: &Storage, idx_layout: &Layout) -> Result<Storage> {
        profiled("scatter_add", 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.scatter_add(layout, shape, axis, idx.cpu("scatter_add", self)?, idx_layout)?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.scatter_add(layout, shape, axis, idx.gpu("scatter_add", self)?, idx_layout)?)),
            }
        })
    }

    /// Concatenate along `axis`; all parts have the same dtype and agree on the other axes.
    pub fn concat(parts: &[(&Storage, &Layout)], axis: usize) -> Result<Storage> {
        profiled("concat", 0.0, || -> Result<Storage> {
            let first = parts[0].0;
            match first {
                Storage::Cpu(_) => {
                    let cpu = parts.iter().map(|(s, l)| Ok((s.cpu("concat", first)?, *l))).collect::<Result<Vec<_>>>()?;
                    Ok(Storage::Cpu(CpuStorage::concat(&cpu, axis)?))
                }
                Storage::Gpu(_) => {
                    let gpu = parts.iter().map(|(s, l)| Ok((s.gpu("concat", first)?, *l))).collect::<Result<Vec<_>>>()?;
                    Ok(Storage::Gpu(GpuStorage::concat(&gpu, axis)?))
                }
            }
        })
    }

    /// Rotary embedding of `x[.., seq, dim]` with `cos`/`sin` of shape `[seq, dim/2]` (contiguous).
    /// `interleaved`: pairs are (2i, 2i+1) (GPT-J / llama.cpp); otherwise (i, i + dim/2)
    /// (Hugging Face LLaMA). `inverse` rotates by −θ (the backward pass).
    pub fn rope(&self, layout: &Layout, cos: &Storage, sin: &Storage, interleaved: bool, inverse: bool) -> Result<Storage> {
        profiled("rope", 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => {
                    Ok(Storage::Cpu(s.rope(layout, cos.cpu("rope", self)?, sin.cpu("rope", self)?, interleaved, inverse)?))
                }
                Storage::Gpu(s) => {
                    Ok(Storage::Gpu(s.rope(layout, cos.gpu("rope", self)?, sin.gpu("rope", self)?, interleaved, inverse)?))
                }
            }
        })
    }

    /// Cross-entropy per row of logits `[n, c]` with integer targets `[n]`; rows whose target
    /// equals `ignore_index` get loss 0. Returns the per-row losses `[n]`.
    pub fn cross_entropy(&self, layout: &Layout, targets: &Storage, t_layout: &Layout, ignore_index: i64) -> Result<Storage> {
        profiled("cross_entropy", 0.0, || -> Result<Storage> {
            match self {
                Storage::Cpu(s) => {
                    Ok(Storage::Cpu(s.cross_entropy(layout, targets.cpu("cross_entropy", self)?, t_layout, ignore_index)?))
                }
                Storage::Gpu(s) => {
                    Ok(Storage::Gpu(s.cross_entropy(layout, targets.gpu("cross_entropy", self)?, t_layout, ignore_index)?))
                }
            }
        })
    }

    /// Gradient of the per-row losses wrt the logits: `(softmax(row) − onehot(target))·g[row]`,
    /// zero for ignored rows.
    pub fn cross_entropy_backward(
        &self,
        layout: &Layout,
        targets: &Storage,
        t_layout: &Layout,
        g: &Storage,
        g_layout: &Layout,
        ignore_index: i64,
    ) -> Result<Storage> {
        profiled("cross_entropy_backward", 0.0, || -> Result<Storage> {
            const OP: &str = "cross_entropy_backward";
            match self {
                Storage::Cpu(s) => Ok(Storage::Cpu(s.cross_entropy_backward(
                    layout,
                    targets.cpu(OP, self)?,
                    t_layout,
                    g.cpu(OP, self)?,
                    g_layout,
                    ignore_index,
                )?)),
                Storage::Gpu(s) => Ok(Storage::Gpu(s.cross_entropy_backward(
                    layout,
                    targets.gpu(OP, self)?,
                    t_layout,
                    g.gpu(OP, self)?,
                    g_layout,
                    ignore_index,
                )?)),
            }
        })
    }

    /// One fused AdamW step: from the parameter `self`, its gradient and the moments `m`, `v`
    /// (contiguous, the parameter's element count) compute `(param', m', v')`:
    /// `m' = β1 m + (1−β1) g`, `v' = β2 v + (1−β2) g²`,
    /// `p' = p (1 − lr·wd) − lr/(1−β1ᵗ) · m' / (√v' / √(1−β2ᵗ) + eps)`.
    pub fn adamw_step(
        &self,
        layout: &Layout,
        grad: &Storage,
        g_layout: &Layout,
        m: &Storage,
        v: &Storage,
        h: &AdamWStep,
    ) -> Result<(Storage, Storage, Storage)> {
        profiled("adamw", 0.0, || -> Result<(Storage, Storage, Storage)> {
            const OP: &str = "adamw_step";
            match self {
                Storage::Cpu(s) => {
                    let (g, m, v) = (grad.cpu(OP, self)?, m.cpu(OP, self)?, v.cpu(OP, self)?);
                    // Contiguous operands (the usual case) are read in place: a copy of each
                    // would be four fresh allocations of the parameter's size per step.
                    let whole = Layout::contiguous(&[m.len()]);
                    match (s, g, m, v) {
                        (CpuStorage::F32(p), CpuStorage::F32(g), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                            let (p, g) = (cpu::contiguous(p, layout), cpu::contiguous(g, g_layout));
                            let (m, v) = (cpu::contiguous(m, &whole), cpu::contiguous(v, &whole));
                            let (p, m, v) = adamw_cpu(&p, &g, &m, &v, h);
                            Ok((Storage::Cpu(CpuStorage::F32(p)), Storage::Cpu(CpuStorage::F32(m)), Storage::Cpu(CpuStorage::F32(v))))
                        }
                        (CpuStorage::F64(p), CpuStorage::F64(g), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                            let (p, g) = (cpu::contiguous(p, layout), cpu::contiguous(g, g_layout));
                            let (m, v) = (cpu::contiguous(m, &whole), cpu::contiguous(v, &whole));
                            let (p, m, v) = adamw_cpu(&p, &g, &m, &v, h);
                            Ok((Storage::Cpu(CpuStorage::F64(p)), Storage::Cpu(CpuStorage::F64(m)), Storage::Cpu(CpuStorage::F64(v))))
                        }
                        (p, g, ..) => Err(Error::DTypeMismatch { op: OP, lhs: p.dtype(), rhs: g.dtype() }),
                    }
                }
                Storage::Gpu(s) => {
                    let (p, m, v) = s.adamw_step(layout, grad.gpu(OP, self)?, g_layout, m.gpu(OP, self)?, v.gpu(OP, self)?, h)?;
                    Ok((Storage::Gpu(p), Storage::Gpu(m), Storage::Gpu(v)))
                }
            }
        })
    }

    /// `n` elements of the uniform stream `(seed, offset)` mapped to `[lo, hi)`.
    pub fn rand_uniform(device: &Device, dtype: DType, n: usize, seed: u64, offset: u64, lo: f64, hi: f64) -> Result<Storage> {
        profiled("rand", 0.0, || -> Result<Storage> {
            match device {
                Device::Cpu => Ok(Storage::Cpu(CpuStorage::rand_uniform(dtype, n, seed, offset, lo, hi)?)),
                Device::Gpu(g) => Ok(Storage::Gpu(GpuStorage::rand(g, dtype, n, seed, offset, false, lo, hi)?)),
            }
        })
    }

    /// `n` elements of the normal stream `(seed, offset)`, `mean + std·z`.
    pub fn rand_normal(device: &Device, dtype: DType, n: usize, seed: u64, offset: u64, mean: f64, std: f64) -> Result<Storage> {
        profiled("rand", 0.0, || -> Result<Storage> {
            match device {
                Device::Cpu => Ok(Storage::Cpu(CpuStorage::rand_normal(dtype, n, seed, offset, mean, std)?)),
                Device::Gpu(g) => Ok(Storage::Gpu(GpuStorage::rand(g, dtype, n, seed, offset, true, mean, std)?)),
            }
        })
    }
}
