//! Reading checkpoints: safetensors files (memory-mapped), sharded Hugging Face directories,
//! `config.json`, and GGUF files (llama.cpp's format).

pub mod config;
pub mod gguf;
pub mod gguf_write;
pub mod safetensors;
pub mod tokenizer;

pub use self::gguf::{GgufFile, GgufLlamaWeights, GgufTokenizer, GgufValue};
pub use self::gguf_write::GgufWriter;
pub use self::safetensors::{Checkpoint, SafetensorsFile};
pub use self::tokenizer::{ChatTemplate, SpecialToken, Tokenizer};

/// Where `scripts/fetch-assets.sh` puts the real model and data sets: `$TINYTUNE_ASSETS`, else
/// `~/.cache/tinytune`.
pub fn assets_dir() -> std::path::PathBuf {
    match std::env::var_os("TINYTUNE_ASSETS") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tinytune"),
    }
}

use crate::backend::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;

/// Open `path` for reading if it is a regular file (or a link to one). A FIFO, socket or
/// device would block or stream forever where a model or adapter file is expected, so it is
/// refused with an error naming the path before it is opened.
pub fn open_regular(path: &std::path::Path) -> Result<std::fs::File> {
    let err = |msg: String| crate::error::Error::Io { path: path.display().to_string(), msg };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a directory" } else { "not a regular file (a pipe, socket or device)" };
        return Err(err(format!("{what}: expected a regular file")));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))
}

/// The bytes of the regular file `path` (see [`open_regular`]).
pub fn read_regular(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(path)?
        .read_to_end(&mut bytes)
        .map_err(|e| crate::error::Error::Io { path: path.display().to_string(), msg: e.to_string() })?;
    Ok(bytes)
}

/// The text of the regular file `path` (UTF-8; see [`open_regular`]).
pub fn read_regular_string(path: &std::path::Path) -> Result<String> {
    String::from_utf8(read_regular(path)?)
        .map_err(|e| crate::error::Error::Format { path: path.display().to_string(), msg: format!("not UTF-8 text: {e}") })
}

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
    /// Load a frozen matrix as stored (`--base-dtype keep`): f16/bf16 stay 16-bit, GGUF blocks
    /// stay quantised (a [`crate::quant::QMatrix`]; on the GPU, which has no decoders yet, f16).
    fn get_stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.get(name, shape, DType::F32, device)
    }
}

impl Weights for Checkpoint {
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Checkpoint::get(self, name, shape, dtype, device)
    }
    fn get_stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let stored = match self.info(name).map(|i| i.1) {
            Some(d) if d == "F16" => DType::F16,
            Some(d) if d == "BF16" => DType::BF16,
            _ => DType::F32,
        };
        Checkpoint::get(self, name, shape, stored, device)
    }
}
