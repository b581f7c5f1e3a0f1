//! Reading checkpoints: safetensors files (memory-mapped), sharded Hugging Face directories,
//! `config.json`, and GGUF files (llama.cpp's format).

pub mod config;
pub mod gguf;
pub mod safetensors;
pub mod tokenizer;

pub use self::gguf::{GgufFile, GgufLlamaWeights, GgufTokenizer, GgufValue};
pub use self::safetensors::{Checkpoint, SafetensorsFile};
pub use self::tokenizer::{ChatTemplate, SpecialToken, Tokenizer};

use crate::backend::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;

/// A source of named weights (Hugging Face module paths) that models load from: a safetensors
/// checkpoint, or a GGUF file whose tensors are renamed to those paths.
pub trait Weights {
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// Load `name`, check it has `shape`, convert it to `dtype`; errors name the file.
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
}

impl Weights for Checkpoint {
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Checkpoint::get(self, name, shape, dtype, device)
    }
}
