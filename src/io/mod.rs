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

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (where `huggingface_hub` and `transformers` download to).
pub fn hf_hub_cache() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
        return d.into();
    }
    match std::env::var_os("HF_HOME") {
        Some(h) => std::path::PathBuf::from(h).join("hub"),
        None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/huggingface/hub"),
    }
}

/// The Hugging Face id of a path inside the hub cache (`…/models--org--name/snapshots/…`), so an
/// adapter trained on a cached model names its base as Hugging Face does.
pub fn hf_cache_id(path: &std::path::Path) -> Option<String> {
    let comps: Vec<String> = path.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let at = comps.iter().position(|c| c == "snapshots")?;
    let (org, name) = comps.get(at.checked_sub(1)?)?.strip_prefix("models--")?.split_once("--")?;
    Some(format!("{org}/{name}"))
}

/// [`resolve_model`] as a command-line value parser (`--model`).
pub fn model_arg(arg: &str) -> std::result::Result<std::path::PathBuf, String> {
    resolve_model(arg).map_err(|e| e.to_string())
}

/// What `--model` names: a path (a Hugging Face directory or a `.gguf` file) as it is, or a
/// Hugging Face model id (`org/name`, or `org/name@revision`) resolved in the local hub cache
/// ([`hf_hub_cache`]) without the network: `models--org--name/snapshots/<commit>`, the commit
/// read from `refs/<revision>` (default `main`), or the only snapshot when there are no refs.
/// An id that is neither an existing path nor in the cache is an error that says where it
/// looked; anything else that does not exist is returned unchanged for the loader to report.
pub fn resolve_model(arg: &str) -> Result<std::path::PathBuf> {
    resolve_model_in(arg, &hf_hub_cache())
}

/// [`resolve_model`] with the hub cache at `cache`.
pub fn resolve_model_in(arg: &str, cache: &std::path::Path) -> Result<std::path::PathBuf> {
    let path = std::path::Path::new(arg);
    let (id, revision) = arg.split_once('@').unwrap_or((arg, "main"));
    let parts: Vec<&str> = id.split('/').collect();
    let id_like = parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.'));
    if path.exists() || !id_like {
        return Ok(path.to_path_buf());
    }
    let repo = cache.join(format!("models--{}--{}", parts[0], parts[1]));
    let not_found = |why: String| crate::error::Error::Io {
        path: arg.to_string(),
        msg: format!(
            "not a file or directory, and not in the Hugging Face cache: {why} (looked in {}; \
             the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub; download \
             it once with `huggingface-cli download {id}`, or pass the model's directory or .gguf file)",
            repo.display()
        ),
    };
    if !repo.is_dir() {
        return Err(not_found("it has not been downloaded".to_string()));
    }
    let snapshots = repo.join("snapshots");
    let commit = match std::fs::read_to_string(repo.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        // A commit hash given as the revision, or a cache without refs holding one snapshot.
        Err(_) if snapshots.join(revision).is_dir() => revision.to_string(),
        Err(_) => {
            let all: Vec<String> = std::fs::read_dir(&snapshots)
                .map(|d| {
                    d.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
                })
                .unwrap_or_default();
            match &all[..] {
                [one] if revision == "main" => one.clone(),
                _ => return Err(not_found(format!("no refs/{revision}, and {} snapshots to choose from", all.len()))),
            }
        }
    };
    let dir = snapshots.join(&commit);
    if !dir.is_dir() {
        return Err(not_found(format!("refs/{revision} names {commit}, which has no snapshot directory")));
    }
    // A snapshot holding only a GGUF file: the file itself (a directory load needs config.json).
    if !dir.join("config.json").exists() {
        let ggufs: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
                    .collect()
            })
            .unwrap_or_default();
        if let [one] = &ggufs[..] {
            return Ok(one.clone());
        }
    }
    Ok(dir)
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
