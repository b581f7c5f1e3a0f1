//! tinytune: fine-tune language models on any GPU without CUDA.
//!
//! This crate is built bottom-up; the layers so far:
//! - [`backend`]: the primitive kernels every device implements (CPU on rayon today);
//! - [`tensor`]: the [`Tensor`] handle, views and every op with its backward rule;
//! - [`autograd`]: reverse-mode differentiation, `no_grad` scopes;
//! - [`rng`]: the counter-based Philox generator shared by all devices.

pub mod autograd;
pub mod backend;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod rng;
pub mod tensor;

pub use autograd::{no_grad, with_no_grad};
pub use backend::{CmpOp, Device};
pub use dtype::DType;
pub use error::{Error, Result};
pub use rng::Rng;
pub use tensor::{CrossEntropyReduction, RopeLayout, Tensor};
