//! safetensors checkpoints, memory-mapped with `memmap2` and parsed by the `safetensors`
//! crate (which validates the header length, the JSON header, and that every tensor's byte
//! range lies inside the data and matches its shape and dtype). A Hugging Face model directory
//! holds `model.safetensors`, or shards listed in `model.safetensors.index.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};

use crate::backend::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io { path: path.display().to_string(), msg: e.to_string() }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), msg: msg.into() }
}

/// Where one tensor lies in a mapped file.
#[derive(Debug, Clone)]
struct Entry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// One memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    entries: HashMap<String, Entry>,
}

/// Map the regular file `path` read-only.
pub fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = super::open_regular(path)?;
    // SAFETY: the map is read-only; like every mmap-based loader, we rely on the file not
    // being truncated by another process while it is mapped.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))
}

impl SafetensorsFile {
    /// Map and validate a file. Nothing is copied until a tensor is loaded.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        SafetensorsFile::from_map(path, map(path)?)
    }

    /// Validate a file already mapped with [`map`] (whose bytes a caller may have checked).
    pub fn from_map(path: &Path, mmap: memmap2::Mmap) -> Result<SafetensorsFile> {
        let parsed =
            safetensors::SafeTensors::deserialize(&mmap).map_err(|e| format_err(path, format!("not a valid safetensors file: {e}")))?;
        let base = mmap.as_ptr() as usize;
        let mut entries = HashMap::new();
        for (name, view) in parsed.tensors() {
            // The crate hands out slices of the map; their offsets are the tensor's position.
            let start = view.data().as_ptr() as usize - base;
            entries.insert(name, Entry { dtype: view.dtype(), shape: view.shape().to_vec(), start, end: start + view.data().len() });
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Shape and dtype name of a tensor, if present.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, String)> {
        self.entries.get(name).map(|e| (e.shape.clone(), format!("{:?}", e.dtype)))
    }

    /// Load a tensor in its stored dtype (F32, F16, BF16, F64, I32, U32); other dtypes are an
    /// error naming the file and the tensor.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| format_err(&self.path, format!("no tensor named '{name}'")))?;
        let bytes = &self.mmap[e.start..e.end];
        let shape = &e.shape;
        // Little-endian bytes to typed values (copying: the map need not be aligned).
        fn decode<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
            bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()
        }
        use safetensors::Dtype as D;
        match e.dtype {
            D::F32 => Tensor::from_vec(decode::<f32>(bytes), shape, device),
            D::F64 => Tensor::from_vec(decode::<f64>(bytes), shape, device),
            D::F16 => Tensor::from_vec(decode::<u16>(bytes).into_iter().map(f16::from_bits).collect::<Vec<_>>(), shape, device),
            D::BF16 => Tensor::from_vec(decode::<u16>(bytes).into_iter().map(bf16::from_bits).collect::<Vec<_>>(), shape, device),
            D::I32 => Tensor::from_vec(decode::<i32>(bytes), shape, device),
            D::U32 => Tensor::from_vec(decode::<u32>(bytes), shape, device),
            other => Err(format_err(
                &self.path,
                format!("tensor '{name}' has dtype {other:?}, which tinytune does not read (F32, F16, BF16, F64, I32, U32)"),
            )),
        }
    }
}

/// All the weights of a model: one safetensors file, or the shards of a Hugging Face
/// directory. Lookups name the file the tensor was expected in.
pub struct Checkpoint {
    files: Vec<Arc<SafetensorsFile>>,
    index: HashMap<String, usize>,
    origin: PathBuf,
}

impl Checkpoint {
    /// Open `path`: a `.safetensors` file, or a directory with `model.safetensors` or
    /// `model.safetensors.index.json` (sharded).
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let files: Vec<PathBuf> = if path.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if single.exists() {
                vec![single]
            } else if index.exists() {
                let text = super::read_regular_string(&index)?;
                let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format_err(&index, format!("invalid JSON: {e}")))?;
                let map = json
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| format_err(&index, "missing object field 'weight_map'"))?;
                let mut shards: Vec<String> = Vec::new();
                for (tensor, shard) in map {
                    let shard = shard.as_str().ok_or_else(|| format_err(&index, format!("weight_map['{tensor}'] is not a file name")))?;
                    if shard.contains('/') || shard.contains('\\') || shard.contains("..") {
                        return Err(format_err(&index, format!("weight_map['{tensor}'] = '{shard}' points outside the directory")));
                    }
                    if !shards.iter().any(|s| s == shard) {
                        shards.push(shard.to_string());
                    }
                }
                shards.sort();
                shards.into_iter().map(|s| path.join(s)).collect()
            } else {
                return Err(format_err(path, "no model.safetensors or model.safetensors.index.json in this directory"));
            }
        } else {
            vec![path.to_path_buf()]
        };
        let mut opened = Vec::new();
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let st = SafetensorsFile::open(f)?;
            for n in st.names() {
                index.insert(n.to_string(), i);
            }
            opened.push(Arc::new(st));
        }
        Ok(Checkpoint { files: opened, index, origin: path.to_path_buf() })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// Shape and stored dtype of a tensor, if present.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, String)> {
        self.index.get(name).and_then(|&i| self.files[i].info(name))
    }

    /// Load `name`, check it has `shape`, and convert it to `dtype`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let i =
            *self.index.get(name).ok_or_else(|| format_err(&self.origin, format!("missing tensor '{name}' (expected shape {shape:?})")))?;
        let file = &self.files[i];
        let t = file.load(name, device)?;
        if t.shape() != shape {
            return Err(format_err(file.path(), format!("tensor '{name}' has shape {:?}, the config implies {shape:?}", t.shape())));
        }
        t.to_dtype(dtype)
    }
}

/// One tensor's bytes for the safetensors serializer.
struct Owned {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Owned {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The bytes of a safetensors file holding `tensors` (in their own dtypes; F32, F64, F16,
/// BF16, U32, I32) and string `metadata`.
pub fn serialize(tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let owned = tensors
        .iter()
        .map(|(name, t)| {
            use safetensors::Dtype as D;
            let (dtype, bytes) = match t.dtype() {
                DType::F32 => (D::F32, bytemuck::cast_slice(&t.to_vec::<f32>()?).to_vec()),
                DType::F64 => (D::F64, bytemuck::cast_slice(&t.to_vec::<f64>()?).to_vec()),
                DType::F16 => (D::F16, t.to_vec::<f16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect()),
                DType::BF16 => (D::BF16, t.to_vec::<bf16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect()),
                DType::U32 => (D::U32, bytemuck::cast_slice(&t.to_vec::<u32>()?).to_vec()),
                DType::I32 => (D::I32, bytemuck::cast_slice(&t.to_vec::<i32>()?).to_vec()),
                DType::Quant(f) => {
                    return Err(crate::Error::InvalidArgument {
                        op: "safetensors",
                        msg: format!("'{name}' is a {f} matrix: safetensors holds it dequantised (to_dtype) or as GGUF (tinytune export)"),
                    })
                }
            };
            Ok((name.clone(), Owned { dtype, shape: t.shape().to_vec(), bytes }))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(owned.iter().map(|(n, o)| (n.as_str(), o)), metadata)
        .map_err(|e| Error::InvalidArgument { op: "save safetensors", msg: e.to_string() })
}

/// Write `tensors` to `path` as safetensors, atomically (temporary file, then rename).
pub fn save(path: impl AsRef<Path>, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    super::write_atomic(path.as_ref(), &serialize(tensors, metadata)?)
}
