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

/// Write `bytes` to `path` so that a reader sees the old file or the new one, never a part:
/// write a temporary file beside it, flush it to disk, rename it over `path`. If anything
/// fails (a full disk, no permission), the previous file is untouched and the error names
/// the path.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let err = |e: std::io::Error| crate::error::Error::Io { path: path.display().to_string(), msg: e.to_string() };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

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
