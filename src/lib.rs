//! tinytune: fine-tune language models on any GPU without CUDA.
//!
//! This crate is built bottom-up; the layers so far:
//! - [`backend`]: the primitive kernels every device implements (CPU on rayon today);
//! - [`tensor`]: the [`Tensor`] handle, views and every op with its backward rule;
//! - [`autograd`]: reverse-mode differentiation, `no_grad` scopes;
//! - [`rng`]: the counter-based Philox generator shared by all devices.
//!
//! ```
//! use tinytune::{CrossEntropyReduction, DType, Device, Rng, Tensor};
//!
//! let dev = Device::Cpu;
//! let mut rng = Rng::new(0);
//! let x = Tensor::randn(&[8, 16], 0.0, 1.0, DType::F32, &dev, &mut rng)?;
//! let w = Tensor::randn(&[16, 4], 0.0, 0.25, DType::F32, &dev, &mut rng)?.requires_grad()?;
//! let y = Tensor::from_vec(vec![0u32, 1, 2, 3, 0, 1, 2, 3], &[8], &dev)?;
//! let loss = x.matmul(&w)?.cross_entropy(&y, -100, CrossEntropyReduction::Mean)?;
//! loss.backward()?;
//! assert_eq!(w.grad().unwrap().shape(), &[16, 4]);
//! # Ok::<(), tinytune::Error>(())
//! ```

pub mod autograd;
pub mod backend;
#[cfg(feature = "cli")]
pub mod cli;
pub mod dtype;
pub mod error;
pub mod io;
pub mod kernels;
pub mod layout;
pub mod linalg;
pub mod mem;
pub mod models;
pub mod nn;
pub mod optim;
pub mod peft;
pub mod profile;
pub mod quant;
pub mod rng;
pub mod tensor;
pub mod train;

pub use autograd::{no_grad, with_no_grad};
pub use backend::{CmpOp, Device, GpuDevice, MemoryStats};
pub use dtype::DType;
pub use error::{Error, Result};
pub use rng::Rng;
pub use tensor::{CrossEntropyReduction, RopeLayout, Tensor};

/// Print a line on standard error, ignoring a failure to write it (stderr closed, or on a
/// full disk): a message must never stop the work or panic, as `eprintln!` would.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}
pub(crate) use say;
