//! The tensor handle: a shared storage on one device, a layout (shape, strides, offset), a
//! dtype, and for autograd the node that made it and the gradient of a leaf.
//!
//! Cloning a `Tensor` is cheap (an `Arc`). Views (`reshape` of contiguous data, `permute`,
//! `transpose`, `narrow`, `broadcast_to`, `squeeze`/`unsqueeze`) share the storage; `contiguous()`
//! copies only when the layout is not already row-major.

mod gated;
mod lora;
mod nn_ops;
mod ops;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::autograd::{self, BackwardFn, Node};
use crate::backend::cpu::Elem;
use crate::backend::{CpuStorage, Device, Storage};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{resolve_axis, Layout};
use crate::rng::Rng;

pub use crate::backend::cpu::attention::AttnSpec;
pub use nn_ops::{CrossEntropyReduction, RopeLayout};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    storage: RwLock<Arc<Storage>>,
    layout: Layout,
    dtype: DType,
    device: Device,
    node: Option<Node>,
    requires_grad: bool,
    grad: Mutex<Option<Tensor>>,
}

impl Drop for Inner {
    /// Free a graph iteratively: dropping the last handle of a long chain of ops would
    /// otherwise recurse once per op and could overflow the stack.
    fn drop(&mut self) {
        let mut stack: Vec<Tensor> = self.node.take().map(|n| n.inputs).unwrap_or_default();
        while let Some(t) = stack.pop() {
            if let Ok(mut inner) = Arc::try_unwrap(t.0) {
                if let Some(n) = inner.node.take() {
                    stack.extend(n.inputs);
                }
            }
        }
    }
}

/// An n-dimensional array on a device, with optional gradient tracking.
#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor(shape={:?}, dtype={:?}, device={}, requires_grad={})",
            self.shape(),
            self.dtype(),
            self.device(),
            self.requires_grad_flag()
        )
    }
}

impl Tensor {
    // ----- construction -------------------------------------------------------------------

    fn from_parts(storage: Arc<Storage>, layout: Layout, node: Option<Node>, requires_grad: bool) -> Tensor {
        let (dtype, device) = (storage.dtype(), storage.device());
        Tensor(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            storage: RwLock::new(storage),
            layout,
            dtype,
            device,
            node,
            requires_grad,
            grad: Mutex::new(None),
        }))
    }

    /// A leaf tensor owning a fresh contiguous storage.
    pub(crate) fn from_storage(storage: Storage, shape: &[usize]) -> Tensor {
        Tensor::from_parts(Arc::new(storage), Layout::contiguous(shape), None, false)
    }

    /// The result of an op: records `backward` when a gradient is wanted from any input.
    pub(crate) fn from_op(
        storage: Storage,
        shape: &[usize],
        op: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        Tensor::with_node(Arc::new(storage), Layout::contiguous(shape), op, inputs, Box::new(backward))
    }

    /// Like `from_op`, for a storage that a graph-free handle ([`Tensor::leaf_shared`]) also holds.
    pub(crate) fn from_op_shared(
        storage: Arc<Storage>,
        shape: &[usize],
        op: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        Tensor::with_node(storage, Layout::contiguous(shape), op, inputs, Box::new(backward))
    }

    /// A graph-free contiguous handle on an existing storage.
    pub(crate) fn leaf_shared(storage: Arc<Storage>, shape: &[usize]) -> Tensor {
        Tensor::from_parts(storage, Layout::contiguous(shape), None, false)
    }

    fn with_node(storage: Arc<Storage>, layout: Layout, op: &'static str, inputs: &[&Tensor], backward: BackwardFn) -> Tensor {
        let track = autograd::is_grad_enabled() && inputs.iter().any(|t| t.requires_grad_flag());
        let node = track.then(|| Node { op, inputs: inputs.iter().map(|t| (*t).clone()).collect(), backward });
        Tensor::from_parts(storage, layout, node, track)
    }

    /// `value`'s data as the output of a node recorded whenever recording is on, even when no
    /// input requires a gradient: for ops whose backward reaches trainable tensors the graph
    /// does not show (gradient checkpointing).
    pub(crate) fn from_op_always(
        value: &Tensor,
        op: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        let track = autograd::is_grad_enabled();
        let node = track.then(|| Node { op, inputs: inputs.iter().map(|t| (*t).clone()).collect(), backward: Box::new(backward) });
        Tensor::from_parts(value.storage_arc(), value.layout().clone(), node, track)
    }

    /// A view: same storage, another layout.
    pub(crate) fn view_op(
        &self,
        layout: Layout,
        op: &'static str,
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        Tensor::with_node(self.storage_arc(), layout, op, &[self], Box::new(backward))
    }

    /// A tensor from host data (`f32`, `f64`, `half::f16`, `half::bf16`, `u32` or `i32`).
    pub fn from_vec<T: Elem>(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(Error::ElementCount { op: "from_vec", len: data.len(), shape: shape.to_vec(), expected });
        }
        let cpu = cpu_storage_from_vec(data);
        Ok(Tensor::from_storage(Storage::from_cpu(device, cpu)?, shape))
    }

    pub fn from_slice<T: Elem>(data: &[T], shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    /// A `[rows, cols]` tensor holding a quantised matrix (frozen weights; see
    /// [`crate::quant`]), kept as stored on either device: the product kernels decode it.
    pub fn from_qmatrix(q: crate::quant::QMatrix, device: &Device) -> Result<Tensor> {
        let shape = [q.rows(), q.cols()];
        let cpu = crate::backend::CpuStorage::Quant(std::sync::Arc::new(q));
        Ok(Tensor::from_storage(Storage::from_cpu(device, cpu)?, &shape))
    }

    /// This rank-2 tensor quantised to `format` (its values are read as f32 first). The result
    /// is frozen: it takes no gradient.
    pub fn quantize(&self, format: crate::quant::QFormat) -> Result<Tensor> {
        if self.rank() != 2 {
            return Err(Error::Shape { op: "quantize", msg: format!("quantises a matrix [rows, cols], got shape {:?}", self.shape()) });
        }
        let (rows, cols) = (self.shape()[0], self.shape()[1]);
        let q = crate::quant::QMatrix::quantize(format, rows, cols, &self.to_dtype(DType::F32)?.to_vec::<f32>()?)
            .map_err(|msg| Error::InvalidArgument { op: "quantize", msg })?;
        Tensor::from_qmatrix(q, self.device())
    }

    /// The quantised matrix this tensor holds, when it holds one whole (not a view of part).
    pub fn qmatrix(&self) -> Option<std::sync::Arc<crate::quant::QMatrix>> {
        match &*self.storage_arc() {
            Storage::Cpu(crate::backend::CpuStorage::Quant(q)) if self.shape() == [q.rows(), q.cols()] && self.is_contiguous() => {
                Some(q.clone())
            }
            _ => None,
        }
    }

    /// Bytes the whole underlying buffer takes in memory (a view reports its base's buffer).
    pub fn storage_bytes(&self) -> usize {
        match &*self.storage_arc() {
            Storage::Cpu(c) => c.bytes(),
            Storage::Gpu(g) => g.bytes(),
        }
    }

    /// A rank-0 f32 tensor.
    pub fn scalar(v: f32, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(vec![v], &[], device)
    }

    pub fn full(shape: &[usize], v: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        not_quant("full", dtype)?;
        Ok(Tensor::from_storage(Storage::full(device, dtype, crate::mem::checked_numel("full", shape, dtype.size_in_bytes())?, v)?, shape))
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        not_quant("zeros", dtype)?;
        Ok(Tensor::from_storage(Storage::zeros(device, dtype, crate::mem::checked_numel("zeros", shape, dtype.size_in_bytes())?)?, shape))
    }

    pub fn ones(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(shape, 1.0, dtype, device)
    }

    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(self.shape(), self.dtype(), self.device())
    }

    pub fn ones_like(&self) -> Result<Tensor> {
        Tensor::ones(self.shape(), self.dtype(), self.device())
    }

    pub fn full_like(&self, v: f64) -> Result<Tensor> {
        Tensor::full(self.shape(), v, self.dtype(), self.device())
    }

    /// A small table computed on the host in f64 (positions, masks, RoPE angles), stored as
    /// `dtype` on `device`.
    pub(crate) fn from_host_f64(v: Vec<f64>, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    /// `start, start+step, ..` below `end`, as a 1-d tensor of `dtype`.
    pub fn arange(start: f64, end: f64, step: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        if step == 0.0 || !step.is_finite() || !start.is_finite() || !end.is_finite() {
            return Err(Error::InvalidArgument {
                op: "arange",
                msg: format!("need finite bounds and a non-zero step, got {start}..{end} step {step}"),
            });
        }
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        let v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
        Tensor::from_host_f64(v, &[n], dtype, device)
    }

    /// Uniform in `[lo, hi)` from the counter-based stream `rng.next_stream()`.
    pub fn rand_uniform(shape: &[usize], lo: f64, hi: f64, dtype: DType, device: &Device, rng: &mut Rng) -> Result<Tensor> {
        not_quant("rand_uniform", dtype)?;
        let (seed, offset) = rng.next_stream();
        Ok(Tensor::from_storage(
            Storage::rand_uniform(device, dtype, crate::mem::checked_numel("rand", shape, dtype.size_in_bytes())?, seed, offset, lo, hi)?,
            shape,
        ))
    }

    /// Normal with the given mean and standard deviation from `rng.next_stream()`.
    pub fn randn(shape: &[usize], mean: f64, std: f64, dtype: DType, device: &Device, rng: &mut Rng) -> Result<Tensor> {
        not_quant("randn", dtype)?;
        let (seed, offset) = rng.next_stream();
        Ok(Tensor::from_storage(
            Storage::rand_normal(
                device,
                dtype,
                crate::mem::checked_numel("randn", shape, dtype.size_in_bytes())?,
                seed,
                offset,
                mean,
                std,
            )?,
            shape,
        ))
    }

    // ----- accessors ----------------------------------------------------------------------

    /// Unique id of this tensor handle (views and results get their own).
    pub fn id(&self) -> u64 {
        self.0.id
    }
    pub fn shape(&self) -> &[usize] {
        self.0.layout.shape()
    }
    pub fn rank(&self) -> usize {
        self.0.layout.rank()
    }
    pub fn numel(&self) -> usize {
        self.0.layout.numel()
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn device(&self) -> &Device {
        &self.0.device
    }
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }
    /// Size of `axis` (negative counts from the end).
    pub fn dim(&self, axis: isize) -> Result<usize> {
        Ok(self.shape()[resolve_axis("dim", axis, self.shape())?])
    }

    pub(crate) fn storage_arc(&self) -> Arc<Storage> {
        self.0.storage.read().expect("storage lock poisoned").clone()
    }

    pub(crate) fn node(&self) -> Option<&Node> {
        self.0.node.as_ref()
    }

    /// The elements in row-major order; `T` must be the tensor's dtype.
    pub fn to_vec<T: Elem>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch { op: "to_vec", lhs: self.dtype(), rhs: T::DTYPE });
        }
        let cpu = self.storage_arc().to_cpu(self.layout())?;
        Ok(vec_from_cpu_storage(cpu))
    }

    /// The elements in row-major order, converted to f64 (any dtype).
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        let s = self.storage_arc();
        let cpu = s.to_cpu(self.layout())?;
        Ok(cpu.to_f64_vec(&Layout::contiguous(self.shape())))
    }

    /// The single element of a one-element tensor, as f64.
    pub fn to_scalar(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::Shape { op: "to_scalar", msg: format!("needs exactly one element, shape is {:?}", self.shape()) });
        }
        Ok(self.to_vec_f64()?[0])
    }

    /// Convert to another dtype (a copy; gradients flow back through float-to-float casts).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let out = self.storage_arc().cast(self.layout(), dtype)?;
        let src = self.dtype();
        Ok(Tensor::from_op(out, self.shape(), "to_dtype", &[self], move |g| Ok(vec![Some(g.to_dtype(src)?)])))
    }

    /// Move to another device (a copy; the gradient moves back).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let cpu = self.storage_arc().to_cpu(self.layout())?;
        let back = self.device().clone();
        Ok(Tensor::from_op(Storage::from_cpu(device, cpu)?, self.shape(), "to_device", &[self], move |g| {
            Ok(vec![Some(g.to_device(&back)?)])
        }))
    }

    // ----- autograd -----------------------------------------------------------------------

    /// A new leaf sharing this tensor's data that requires a gradient (a trainable parameter).
    pub fn requires_grad(&self) -> Result<Tensor> {
        if !self.dtype().is_compute() {
            return Err(Error::DType { op: "requires_grad", expected: "f32 or f64", got: self.dtype() });
        }
        Ok(Tensor::from_parts(self.storage_arc(), self.layout().clone(), None, true))
    }

    /// Whether a gradient flows to this tensor.
    pub fn requires_grad_flag(&self) -> bool {
        self.0.requires_grad
    }

    /// Whether this tensor is a leaf (made by the user, not by an op that recorded a graph).
    pub fn is_leaf(&self) -> bool {
        self.0.node.is_none()
    }

    /// The same data with no graph behind it.
    pub fn detach(&self) -> Tensor {
        Tensor::from_parts(self.storage_arc(), self.layout().clone(), None, false)
    }

    /// The accumulated gradient of a leaf, if any.
    pub fn grad(&self) -> Option<Tensor> {
        self.0.grad.lock().expect("grad lock poisoned").clone()
    }

    /// Clear the accumulated gradient.
    pub fn zero_grad(&self) {
        *self.0.grad.lock().expect("grad lock poisoned") = None;
    }

    pub(crate) fn accumulate_grad(&self, g: &Tensor) -> Result<()> {
        let mut slot = self.0.grad.lock().expect("grad lock poisoned");
        let new = match slot.take() {
            Some(prev) => prev.add(g)?,
            None => g.detach(),
        };
        *slot = Some(new);
        Ok(())
    }

    /// Back-propagate from this scalar into every leaf that requires a gradient.
    pub fn backward(&self) -> Result<()> {
        autograd::backward(self)
    }

    /// Replace this leaf's data with `value`'s (same shape and dtype), e.g. an optimizer step.
    /// Views made earlier keep the old data. On the same device the data never visits the
    /// host: a contiguous `value` at offset 0 is shared as is (storages are never written in
    /// place, so sharing is safe), any other layout is copied on the device.
    pub fn set_data(&self, value: &Tensor) -> Result<()> {
        if value.shape() != self.shape() {
            return Err(Error::ShapeMismatch { op: "set_data", lhs: self.shape().to_vec(), rhs: value.shape().to_vec() });
        }
        if value.dtype() != self.dtype() {
            return Err(Error::DTypeMismatch { op: "set_data", lhs: self.dtype(), rhs: value.dtype() });
        }
        self.check_updatable("set_data")?;
        let src = value.storage_arc();
        let fresh = if value.device() != self.device() {
            Arc::new(Storage::from_cpu(self.device(), src.to_cpu(value.layout())?)?)
        } else if value.is_contiguous() && value.layout().offset() == 0 && src.len() == value.numel() {
            src
        } else {
            Arc::new(src.cast(value.layout(), value.dtype())?)
        };
        *self.0.storage.write().expect("storage lock poisoned") = fresh;
        Ok(())
    }

    /// Only a contiguous tensor at offset 0 (a leaf made by a constructor or `requires_grad`)
    /// can have its storage swapped: its layout then reads a whole buffer of `numel` elements.
    fn check_updatable(&self, op: &'static str) -> Result<()> {
        if !self.is_contiguous() || self.layout().offset() != 0 {
            return Err(Error::Shape {
                op,
                msg: format!(
                    "only a contiguous tensor at offset 0 (a leaf made by a constructor) can be updated in place; this one has shape {:?}, strides {:?}, offset {}",
                    self.shape(),
                    self.layout().strides(),
                    self.layout().offset()
                ),
            });
        }
        Ok(())
    }

    /// Swap this tensor's buffer for `storage` (an optimizer's fresh parameter), without any
    /// copy: `storage` must hold exactly `numel` elements of this dtype on this device, and this
    /// tensor must be contiguous at offset 0. Every clone of this handle sees the new data;
    /// views made earlier keep the old buffer.
    pub(crate) fn replace_storage(&self, storage: Arc<Storage>) -> Result<()> {
        self.check_updatable("replace_storage")?;
        if storage.dtype() != self.dtype() {
            return Err(Error::DTypeMismatch { op: "replace_storage", lhs: self.dtype(), rhs: storage.dtype() });
        }
        if &storage.device() != self.device() {
            return Err(Error::DeviceMismatch { op: "replace_storage", lhs: self.device().to_string(), rhs: storage.device().to_string() });
        }
        if storage.len() != self.numel() {
            return Err(Error::ElementCount {
                op: "replace_storage",
                len: storage.len(),
                shape: self.shape().to_vec(),
                expected: self.numel(),
            });
        }
        *self.0.storage.write().expect("storage lock poisoned") = storage;
        Ok(())
    }

    /// Set (or with `None` clear) the accumulated gradient of this tensor, e.g. a clipped
    /// gradient. The gradient must have this tensor's shape, dtype and device; it is stored
    /// detached.
    pub fn set_grad(&self, g: Option<Tensor>) -> Result<()> {
        if let Some(g) = &g {
            if g.shape() != self.shape() {
                return Err(Error::ShapeMismatch { op: "set_grad", lhs: self.shape().to_vec(), rhs: g.shape().to_vec() });
            }
            if g.dtype() != self.dtype() {
                return Err(Error::DTypeMismatch { op: "set_grad", lhs: self.dtype(), rhs: g.dtype() });
            }
            if g.device() != self.device() {
                return Err(Error::DeviceMismatch { op: "set_grad", lhs: self.device().to_string(), rhs: g.device().to_string() });
            }
        }
        *self.0.grad.lock().expect("grad lock poisoned") = g.map(|g| g.detach());
        Ok(())
    }

    // ----- views --------------------------------------------------------------------------

    /// New shape with the same number of elements; one entry may be `-1` (inferred).
    pub fn reshape(&self, shape: &[isize]) -> Result<Tensor> {
        let shape = infer_shape(shape, self.numel(), self.shape())?;
        self.reshape_to(&shape)
    }

    pub(crate) fn reshape_to(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::ShapeMismatch { op: "reshape", lhs: self.shape().to_vec(), rhs: shape.to_vec() });
        }
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let src = self.shape().to_vec();
        match self.layout().reshape(shape) {
            Some(l) => Ok(self.view_op(l, "reshape", move |g| Ok(vec![Some(g.reshape_to(&src)?)]))),
            None => self.contiguous()?.reshape_to(shape),
        }
    }

    /// Flatten to 1-d.
    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape_to(&[self.numel()])
    }

    /// Reorder axes: output axis i is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let l = self.layout().permute(perm)?;
        let mut inv = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        Ok(self.view_op(l, "permute", move |g| Ok(vec![Some(g.permute(&inv)?)])))
    }

    /// Swap two axes (negative counts from the end).
    pub fn transpose(&self, a: isize, b: isize) -> Result<Tensor> {
        let (a, b) = (resolve_axis("transpose", a, self.shape())?, resolve_axis("transpose", b, self.shape())?);
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Transpose of the last two axes.
    pub fn t(&self) -> Result<Tensor> {
        self.transpose(-2, -1)
    }

    /// `len` entries of `axis` starting at `start` (a view).
    pub fn narrow(&self, axis: isize, start: usize, len: usize) -> Result<Tensor> {
        let ax = resolve_axis("narrow", axis, self.shape())?;
        let l = self.layout().narrow(ax, start, len)?;
        let full = self.shape().to_vec();
        Ok(self.view_op(l, "narrow", move |g| {
            // The adjoint pads the gradient with zeros back to the full extent of the axis.
            let mut parts = Vec::new();
            let pad = |n: usize| {
                let mut s = full.clone();
                s[ax] = n;
                Tensor::zeros(&s, g.dtype(), g.device())
            };
            if start > 0 {
                parts.push(pad(start)?);
            }
            parts.push(g.clone());
            if start + len < full[ax] {
                parts.push(pad(full[ax] - start - len)?);
            }
            Ok(vec![Some(Tensor::concat(&parts.iter().collect::<Vec<_>>(), ax as isize)?)])
        }))
    }

    /// Split `axis` into pieces of the given sizes (views).
    pub fn split(&self, sizes: &[usize], axis: isize) -> Result<Vec<Tensor>> {
        let ax = resolve_axis("split", axis, self.shape())?;
        if sizes.iter().sum::<usize>() != self.shape()[ax] {
            return Err(Error::Shape {
                op: "split",
                msg: format!("sizes {sizes:?} do not add up to axis {ax} of shape {:?}", self.shape()),
            });
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                let t = self.narrow(ax as isize, start, n);
                start += n;
                t
            })
            .collect()
    }

    /// Split `axis` into `n` equal pieces.
    pub fn chunk(&self, n: usize, axis: isize) -> Result<Vec<Tensor>> {
        let d = self.shape()[resolve_axis("chunk", axis, self.shape())?];
        if n == 0 || d % n != 0 {
            return Err(Error::Shape { op: "chunk", msg: format!("axis of size {d} does not split into {n} equal parts") });
        }
        self.split(&vec![d / n; n], axis)
    }

    /// Insert a size-1 axis at `axis` (`-1` appends).
    pub fn unsqueeze(&self, axis: isize) -> Result<Tensor> {
        let r = self.rank() as isize;
        let ax = if axis < 0 { axis + r + 1 } else { axis };
        if ax < 0 || ax > r {
            return Err(Error::AxisOutOfRange { op: "unsqueeze", axis, shape: self.shape().to_vec() });
        }
        let (mut shape, mut strides) = (self.shape().to_vec(), self.layout().strides().to_vec());
        shape.insert(ax as usize, 1);
        strides.insert(ax as usize, 0);
        let src = self.shape().to_vec();
        Ok(self.view_op(Layout::new(shape, strides, self.layout().offset()), "unsqueeze", move |g| Ok(vec![Some(g.reshape_to(&src)?)])))
    }

    /// Remove a size-1 axis.
    pub fn squeeze(&self, axis: isize) -> Result<Tensor> {
        let ax = resolve_axis("squeeze", axis, self.shape())?;
        if self.shape()[ax] != 1 {
            return Err(Error::Shape { op: "squeeze", msg: format!("axis {ax} of shape {:?} is not of size 1", self.shape()) });
        }
        let (mut shape, mut strides) = (self.shape().to_vec(), self.layout().strides().to_vec());
        shape.remove(ax);
        strides.remove(ax);
        let src = self.shape().to_vec();
        Ok(self.view_op(Layout::new(shape, strides, self.layout().offset()), "squeeze", move |g| Ok(vec![Some(g.reshape_to(&src)?)])))
    }

    /// Stretch size-1 axes (and add leading ones) to `shape` without copying.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let l = self.layout().broadcast_to(shape)?;
        let src = self.shape().to_vec();
        Ok(self.view_op(l, "broadcast_to", move |g| Ok(vec![Some(g.sum_to_shape(&src)?)])))
    }

    /// Alias of [`Tensor::broadcast_to`].
    pub fn expand(&self, shape: &[usize]) -> Result<Tensor> {
        self.broadcast_to(shape)
    }

    /// A row-major copy when the layout is not already row-major; otherwise `self`.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        let out = self.storage_arc().cast(self.layout(), self.dtype())?;
        Ok(Tensor::from_op(out, self.shape(), "contiguous", &[self], |g| Ok(vec![Some(g.clone())])))
    }

    /// A row-major copy starting at storage offset 0, unless already so. For kernels that read
    /// a small operand (norm weights, RoPE tables) as a plain slice from the buffer's start.
    pub(crate) fn compact(&self) -> Result<Tensor> {
        if self.is_contiguous() && self.layout().offset() == 0 {
            return Ok(self.clone());
        }
        let out = self.storage_arc().cast(self.layout(), self.dtype())?;
        Ok(Tensor::from_op(out, self.shape(), "compact", &[self], |g| Ok(vec![Some(g.clone())])))
    }

    /// Sum a broadcast gradient back down to `shape` (the adjoint of broadcasting).
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let extra = self.rank().checked_sub(shape.len()).ok_or_else(|| Error::ShapeMismatch {
            op: "sum_to_shape",
            lhs: self.shape().to_vec(),
            rhs: shape.to_vec(),
        })?;
        let mut axes: Vec<isize> = (0..extra as isize).collect();
        for (i, &d) in shape.iter().enumerate() {
            let src = self.shape()[i + extra];
            if d == 1 && src != 1 {
                axes.push((i + extra) as isize);
            } else if d != src {
                return Err(Error::ShapeMismatch { op: "sum_to_shape", lhs: self.shape().to_vec(), rhs: shape.to_vec() });
            }
        }
        self.sum(&axes, false)?.reshape_to(shape)
    }
}

fn infer_shape(shape: &[isize], numel: usize, src: &[usize]) -> Result<Vec<usize>> {
    let err = || Error::Shape { op: "reshape", msg: format!("cannot reshape {src:?} ({numel} elements) to {shape:?}") };
    let mut infer = None;
    let mut known = 1usize;
    for (i, &d) in shape.iter().enumerate() {
        match d {
            -1 if infer.is_none() => infer = Some(i),
            d if d >= 0 => known *= d as usize,
            _ => return Err(err()),
        }
    }
    let mut out: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    if let Some(i) = infer {
        if known == 0 || numel % known != 0 {
            return Err(err());
        }
        out[i] = numel / known;
    }
    if out.iter().product::<usize>() != numel {
        return Err(err());
    }
    Ok(out)
}

/// Quantised dtypes are made only by [`Tensor::quantize`] and [`Tensor::from_qmatrix`].
fn not_quant(op: &'static str, dtype: DType) -> Result<()> {
    if dtype.is_quant() {
        return Err(Error::InvalidArgument { op, msg: format!("cannot fill a {dtype:?} tensor: quantise an f32 one (Tensor::quantize)") });
    }
    Ok(())
}

fn cpu_storage_from_vec<T: Elem>(data: Vec<T>) -> CpuStorage {
    // Exactly one arm matches T; the others are never taken.
    let any: Box<dyn std::any::Any> = Box::new(data);
    match T::DTYPE {
        DType::F32 => CpuStorage::F32(*any.downcast().expect("dtype tag matches type")),
        DType::F64 => CpuStorage::F64(*any.downcast().expect("dtype tag matches type")),
        DType::F16 => CpuStorage::F16(*any.downcast().expect("dtype tag matches type")),
        DType::BF16 => CpuStorage::BF16(*any.downcast().expect("dtype tag matches type")),
        DType::U32 => CpuStorage::U32(*any.downcast().expect("dtype tag matches type")),
        DType::I32 => CpuStorage::I32(*any.downcast().expect("dtype tag matches type")),
        DType::Quant(_) => unreachable!("no Elem type is quantised"),
    }
}

fn vec_from_cpu_storage<T: Elem>(s: CpuStorage) -> Vec<T> {
    let any: Box<dyn std::any::Any> = match s {
        CpuStorage::F32(v) => Box::new(v),
        CpuStorage::F64(v) => Box::new(v),
        CpuStorage::F16(v) => Box::new(v),
        CpuStorage::BF16(v) => Box::new(v),
        CpuStorage::U32(v) => Box::new(v),
        CpuStorage::I32(v) => Box::new(v),
        CpuStorage::Quant(_) => unreachable!("caller checked the dtype"),
    };
    *any.downcast().expect("caller checked the dtype")
}
