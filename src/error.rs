//! The one error type of the crate. Every message names the op and the shapes or values
//! involved, so a user can tell what went wrong without a debugger.

use crate::dtype::DType;

/// Errors returned by every fallible operation in tinytune.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that had to agree (or broadcast) did not.
    #[error("{op}: shape mismatch, {lhs:?} vs {rhs:?}")]
    ShapeMismatch { op: &'static str, lhs: Vec<usize>, rhs: Vec<usize> },

    /// A shape was wrong for reasons other than a pairwise mismatch.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },

    /// An axis index outside `0..rank`.
    #[error("{op}: axis {axis} out of range for a tensor of shape {shape:?}")]
    AxisOutOfRange { op: &'static str, axis: isize, shape: Vec<usize> },

    /// An operand had a dtype the op does not take.
    #[error("{op}: expected {expected}, got {got:?}")]
    DType { op: &'static str, expected: &'static str, got: DType },

    /// Two operands had different dtypes.
    #[error("{op}: dtype mismatch, {lhs:?} vs {rhs:?}")]
    DTypeMismatch { op: &'static str, lhs: DType, rhs: DType },

    /// Two operands lived on different devices.
    #[error("{op}: device mismatch, {lhs} vs {rhs}")]
    DeviceMismatch { op: &'static str, lhs: String, rhs: String },

    /// An index (embedding id, gather index, class label) outside its valid range.
    #[error("{op}: index {index} out of range for size {size}")]
    IndexOutOfRange { op: &'static str, index: i64, size: usize },

    /// The number of elements in the data does not match the shape.
    #[error("{op}: {len} elements do not fill shape {shape:?} ({expected} needed)")]
    ElementCount { op: &'static str, len: usize, shape: Vec<usize>, expected: usize },

    /// `backward()` called on something that cannot start a backward pass.
    #[error("backward: {0}")]
    Backward(String),

    /// An argument value that is not allowed (a negative probability, eps <= 0, ...).
    #[error("{op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    /// A feature the selected backend does not implement.
    #[error("{op}: not supported on {device}: {msg}")]
    Unsupported { op: &'static str, device: String, msg: String },

    /// No GPU adapter matched the request (no driver, or only a software adapter when a
    /// hardware one was asked for).
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),

    /// A GPU buffer larger than the device allows, or an allocation the device refused.
    #[error("gpu allocation of {bytes} bytes for {what} failed: {msg}")]
    GpuAllocation { what: &'static str, bytes: u64, msg: String },

    /// The GPU device was lost (driver reset, removed, or destroyed); tensors on it are gone.
    #[error("gpu device lost: {0}")]
    DeviceLost(String),

    /// An error reported by the GPU API (validation, shader compilation, mapping).
    #[error("gpu: {0}")]
    Gpu(String),

    /// A size that cannot be allocated: more than the machine's memory, or overflowing.
    #[error("{what}: out of memory: {msg}")]
    OutOfMemory { what: String, msg: String },

    /// A file could not be opened or read.
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },

    /// A file was read but its contents are wrong (malformed header, offsets outside the data,
    /// unknown dtype, a missing or mis-shaped tensor, a bad config field).
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
}

/// Result with the crate's error type.
pub type Result<T> = std::result::Result<T, Error>;
