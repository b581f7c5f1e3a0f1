//! GGUF files (llama.cpp's model format), versions 2 and 3, memory-mapped with `memmap2`.
//!
//! Layout (all little-endian; strings are a u64 byte length then UTF-8 bytes, no terminator):
//!
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 kv_count
//! kv_count × { string key, u32 value_type, value }        value: by type (below); an array is
//!                                                          u32 element_type, u64 n, n values
//! tensor_count × { string name, u32 n_dims, n_dims × u64 ne, u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32)
//! tensor data: each tensor at data_start + offset, offset a multiple of the alignment
//! ```
//!
//! Value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool (one byte, 0 or 1),
//! 8 string, 9 array, 10 u64, 11 i64, 12 f64. Version 1 used u32 counts and lengths (not read
//! here); versions 2 and 3 share this layout (3 allows big-endian files, which cannot be told
//! apart and are not read). `ne[0]` is the fastest axis, so a PyTorch `[out, in]` weight has
//! `ne = [in, out]`: shapes are reversed on load.
//!
//! Every length, count and offset read from the file is checked against the bytes that remain
//! before anything is allocated or sliced, so a malformed file is an [`Error::Format`] naming the
//! file and the field or tensor, never a panic, an out-of-bounds read or a huge allocation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::backend::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::ggml::{self, GgmlType};
use crate::tensor::Tensor;

use super::Weights;

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML's limit on tensor rank.
const MAX_DIMS: u32 = 4;
/// Arrays nest at most this deep (the format allows nesting; real files use one level). The
/// limit keeps a hostile file from recursing the parser off its stack.
const MAX_ARRAY_DEPTH: u32 = 16;

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io { path: path.display().to_string(), msg: e.to_string() }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), msg: msg.into() }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The GGUF name of the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::F32(_) => "float32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F64(_) => "float64",
        }
    }

    /// Any integer type holding a value ≥ 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x as u64),
            GgufValue::U16(x) => Some(x as u64),
            GgufValue::U32(x) => Some(x as u64),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// Any integer type holding a value that fits in an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(x) => Some(x as i64),
            GgufValue::I16(x) => Some(x as i64),
            GgufValue::I32(x) => Some(x as i64),
            GgufValue::I64(x) => Some(x),
            _ => self.as_u64().and_then(|x| i64::try_from(x).ok()),
        }
    }

    /// A float (f32 or f64), or an integer converted to f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x as f64),
            GgufValue::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lies in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML dimensions, fastest axis first (`ne`).
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset from the start of the tensor data section.
    pub offset: u64,
    /// Bytes the tensor takes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The shape in PyTorch order (slowest axis first): `ne` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// The tokenizer a GGUF file carries (`tokenizer.ggml.*`, `tokenizer.chat_template`), copied
/// out of the metadata for the tokenizer to build from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE), `"llama"` (SentencePiece), ...
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer family (`"smollm"`, `"llama-bpe"`, ...).
    pub pre: Option<String>,
    /// The vocabulary, indexed by token id.
    pub tokens: Vec<String>,
    /// Per-token type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    pub token_types: Option<Vec<i32>>,
    /// Per-token scores (SentencePiece models).
    pub scores: Option<Vec<f32>>,
    /// BPE merges, `"a b"`, highest priority first.
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece): a `▁` before the first word.
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
    /// `general.architecture`: Gemma's SentencePiece vocabularies are built differently.
    pub architecture: Option<String>,
}

enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: its metadata in file order and its tensor directory, over the mapped
/// bytes. Tensor data is read (and dequantised) only when a tensor is loaded.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_start: usize,
}

/// A bounds-checked little-endian cursor. Errors are bare messages; callers add the field.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

type Msg<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: u64) -> Msg<&'a [u8]> {
        if n > self.remaining() as u64 {
            return Err(format!(
                "needs {n} bytes at offset {}, but the file ends at {} (truncated or a wrong length)",
                self.pos,
                self.b.len()
            ));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Msg<[u8; N]> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Msg<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Msg<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Msg<String> {
        let len = self.u64().map_err(|e| format!("string length: {e}"))?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "string length {len} at offset {} runs past the end of the file ({} bytes left)",
                self.pos - 8,
                self.remaining()
            ));
        }
        let at = self.pos;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("string at offset {at} is not valid UTF-8 ({e})"))
    }

    /// Smallest encoding of a value of type `ty`: bounds array lengths before allocating.
    fn min_size(ty: u32) -> Msg<u64> {
        Ok(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => return Err(format!("unknown value type {ty}")),
        })
    }

    fn value(&mut self, ty: u32, depth: u32) -> Msg<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("bool byte {b} at offset {} is neither 0 nor 1", self.pos - 1)),
            },
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let ety = self.u32().map_err(|e| format!("array element type: {e}"))?;
                let min = Self::min_size(ety).map_err(|e| format!("array element type: {e}"))?;
                let n = self.u64().map_err(|e| format!("array length: {e}"))?;
                // Every element takes at least `min` bytes: a longer array cannot fit.
                if n > self.remaining() as u64 / min {
                    return Err(format!("array length {n} cannot fit in the {} bytes left at offset {}", self.remaining(), self.pos));
                }
                let mut v = Vec::with_capacity(n as usize);
                for i in 0..n {
                    v.push(self.value(ety, depth + 1).map_err(|e| format!("array element {i}: {e}"))?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            _ => return Err(format!("unknown value type {ty}")),
        })
    }
}

impl GgufFile {
    /// Map and parse a GGUF file. Nothing is copied until a tensor is loaded.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = super::open_regular(path)?;
        // SAFETY: the map is read-only; like every mmap-based loader, we rely on the file not
        // being truncated by another process while it is mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        GgufFile::parse(path.to_path_buf(), Bytes::Map(mmap))
    }

    /// Parse GGUF bytes held in memory (`path` only names them in errors): for tests and fuzzing.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::parse(path.as_ref().to_path_buf(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<GgufFile> {
        let b: &[u8] = &bytes;
        let err = |msg: String| format_err(&path, msg);
        let mut r = Reader { b, pos: 0 };
        let magic = r.take(4).map_err(|_| err(format!("not a GGUF file: {} bytes, shorter than the header", b.len())))?;
        if magic != b"GGUF" {
            return Err(err(format!("not a GGUF file: magic {magic:02x?}, expected \"GGUF\"")));
        }
        let version = r.u32().map_err(|e| err(format!("header version: {e}")))?;
        match version {
            2 | 3 => {}
            1 => return Err(err("GGUF version 1 (32-bit counts) is not supported; convert the file to v3".into())),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(err("big-endian GGUF files are not supported".into()));
            }
            v => return Err(err(format!("GGUF version {v} is not supported (2 and 3 are)"))),
        }
        let n_tensors = r.u64().map_err(|e| err(format!("header tensor_count: {e}")))?;
        let n_kv = r.u64().map_err(|e| err(format!("header metadata_kv_count: {e}")))?;
        // A key/value takes at least 13 bytes (u64 key length, u32 type, a 1-byte value) and a
        // tensor info at least 24 (u64 name length, u32 n_dims, u32 type, u64 offset).
        if n_kv > r.remaining() as u64 / 13 {
            return Err(err(format!("header metadata_kv_count {n_kv} cannot fit in the {} bytes of the file", b.len())));
        }
        if n_tensors > r.remaining() as u64 / 24 {
            return Err(err(format!("header tensor_count {n_tensors} cannot fit in the {} bytes of the file", b.len())));
        }

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = r.string().map_err(|e| err(format!("metadata key #{i}: {e}")))?;
            let ty = r.u32().map_err(|e| err(format!("metadata '{key}': value type: {e}")))?;
            let value = r.value(ty, 0).map_err(|e| err(format!("metadata '{key}': {e}")))?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(err(format!("metadata key '{key}' appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => a,
                _ => return Err(err(format!("metadata 'general.alignment' = {v:?} must be a power of two"))),
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string().map_err(|e| err(format!("tensor info #{i}: name: {e}")))?;
            let terr = |what: &str, e: String| err(format!("tensor '{name}' (info #{i}): {what}: {e}"));
            let n_dims = r.u32().map_err(|e| terr("n_dims", e))?;
            if n_dims > MAX_DIMS {
                return Err(terr("n_dims", format!("{n_dims} dimensions, at most {MAX_DIMS} allowed")));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            let mut n_elements: u64 = 1;
            for d in 0..n_dims {
                let x = r.u64().map_err(|e| terr("dimensions", e))?;
                n_elements = n_elements
                    .checked_mul(x)
                    .filter(|&n| n <= i64::MAX as u64)
                    .ok_or_else(|| terr("dimensions", format!("ne[{d}] = {x} makes the element count overflow")))?;
                ne.push(x);
            }
            let type_id = r.u32().map_err(|e| terr("type", e))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| terr("type", format!("unknown GGML tensor type {type_id}")))?;
            let offset = r.u64().map_err(|e| terr("offset", e))?;
            let row = ne.first().copied().unwrap_or(1);
            if row % ty.block_size() as u64 != 0 {
                return Err(terr("dimensions", format!("ne[0] = {row} is not a multiple of the {ty} block size {}", ty.block_size())));
            }
            let n_bytes = ty.bytes_for(n_elements).ok_or_else(|| terr("dimensions", "byte size overflows".into()))?;
            if offset % alignment != 0 {
                return Err(terr("offset", format!("{offset} is not a multiple of the alignment {alignment}")));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(err(format!("tensor '{name}' appears twice")));
            }
            tensors.push(TensorInfo { name, ne, ty, offset, n_bytes });
        }

        // Tensor data starts at the next multiple of the alignment.
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (b.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(err(format!(
                    "tensor '{}': data at offset {} + {} bytes lies outside the {data_len} bytes of tensor data (starting at {data_start})",
                    t.name, t.offset, t.n_bytes
                )));
            }
        }
        Ok(GgufFile { version, metadata, meta_index, tensors, tensor_index, alignment, data_start: data_start as usize, path, bytes })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of the tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the tensor data section in the file.
    pub fn data_offset(&self) -> usize {
        self.data_start
    }

    /// The metadata, in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// An error naming this file.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        format_err(&self.path, msg)
    }

    /// A non-negative integer field, if present; an error when it has another type.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.error(format!("metadata '{key}' must be a non-negative integer, got {} {v:?}", v.type_name()))),
        }
    }

    /// A required non-negative integer field.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.error(format!("missing metadata '{key}'")))
    }

    /// A number field, if present.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| self.error(format!("metadata '{key}' must be a number, got {} {v:?}", v.type_name())))
            }
        }
    }

    /// A string field, if present.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.error(format!("metadata '{key}' must be a string, got {}", v.type_name()))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.error(format!("metadata '{key}' must be a bool, got {}", v.type_name()))),
        }
    }

    fn opt_array<T>(&self, key: &str, what: &str, f: impl Fn(&GgufValue) -> Option<T>) -> Result<Option<Vec<T>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let a = v.as_array().ok_or_else(|| self.error(format!("metadata '{key}' must be an array of {what}, got {}", v.type_name())))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| f(x).ok_or_else(|| self.error(format!("metadata '{key}'[{i}] must be {what}, got {} {x:?}", x.type_name()))))
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.opt_str("general.architecture")?.ok_or_else(|| self.error("missing metadata 'general.architecture'"))
    }

    /// The tokenizer stored in the file (`tokenizer.ggml.*`); an error naming the field when
    /// the vocabulary is missing or a field has the wrong type.
    pub fn tokenizer(&self) -> Result<GgufTokenizer> {
        let id = |key: &str| -> Result<Option<u32>> {
            self.opt_usize(key)?
                .map(|x| u32::try_from(x).map_err(|_| self.error(format!("metadata '{key}' = {x} is not a token id"))))
                .transpose()
        };
        let tokens = self
            .opt_array("tokenizer.ggml.tokens", "strings", |v| v.as_str().map(str::to_string))?
            .ok_or_else(|| self.error("missing metadata 'tokenizer.ggml.tokens' (no vocabulary in this file)"))?;
        let t = GgufTokenizer {
            model: self.opt_str("tokenizer.ggml.model")?.unwrap_or("").to_string(),
            pre: self.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            token_types: self.opt_array("tokenizer.ggml.token_type", "integers", |v| v.as_i64().and_then(|x| i32::try_from(x).ok()))?,
            scores: self.opt_array("tokenizer.ggml.scores", "numbers", |v| v.as_f64().map(|x| x as f32))?,
            merges: self.opt_array("tokenizer.ggml.merges", "strings", |v| v.as_str().map(str::to_string))?.unwrap_or_default(),
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            add_bos: self.opt_bool("tokenizer.ggml.add_bos_token")?,
            add_eos: self.opt_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: self.opt_bool("tokenizer.ggml.add_space_prefix")?,
            chat_template: self.opt_str("tokenizer.chat_template")?.map(str::to_string),
            architecture: self.opt_str("general.architecture")?.map(str::to_string),
            tokens,
        };
        for (key, len) in [
            ("tokenizer.ggml.token_type", t.token_types.as_ref().map(Vec::len)),
            ("tokenizer.ggml.scores", t.scores.as_ref().map(Vec::len)),
        ] {
            if len.is_some_and(|n| n != t.tokens.len()) {
                return Err(self.error(format!("metadata '{key}' has {} entries for {} tokens", len.unwrap_or(0), t.tokens.len())));
            }
        }
        Ok(t)
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }

    fn info_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name).ok_or_else(|| self.error(format!("no tensor named '{name}'")))
    }

    /// The raw bytes of a tensor (checked to lie inside the file when it was opened).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info_or_err(name)?;
        let start = self.data_start + t.offset as usize;
        Ok(&self.bytes[start..start + t.n_bytes as usize])
    }

    /// Dequantise a tensor to f32, in its stored element order (`ne[0]` fastest, which is
    /// row-major for the PyTorch shape [`TensorInfo::shape`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.info_or_err(name)?;
        let mut out = vec![0f32; t.n_elements() as usize];
        ggml::dequantize(t.ty, self.tensor_bytes(name)?, &mut out).map_err(|e| self.error(format!("tensor '{name}': {e}")))?;
        Ok(out)
    }

    /// Load a tensor as f32 in its PyTorch shape.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.info_or_err(name)?;
        Tensor::from_vec(self.dequantize(name)?, &t.shape(), device)
    }
}

/// llama.cpp's tensor name for a Hugging Face LLaMA module path
/// (`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`), or `None`.
pub fn llama_gguf_name(hf: &str) -> Option<String> {
    gguf_name(hf, LLAMA_BLOCK_NAMES)
}

/// The llama.cpp tensor of a Gemma 3 weight (`model.layers.3.pre_feedforward_layernorm.weight`
/// → `blk.3.ffn_norm.weight`). Gemma 3's `post_attention_layernorm` is a norm of the attention
/// output, not LLaMA's MLP pre-norm, so the block names differ from [`llama_gguf_name`]'s.
pub fn gemma3_gguf_name(hf: &str) -> Option<String> {
    gguf_name(hf, GEMMA3_BLOCK_NAMES)
}

fn gguf_name(hf: &str, block_names: &[(&str, &str)]) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let g = block_names.iter().find(|(h, _)| *h == module)?.1;
    Some(format!("blk.{layer}.{g}.{param}"))
}

/// Hugging Face module → llama.cpp tensor, inside `model.layers.N` / `blk.N`.
const LLAMA_BLOCK_NAMES: &[(&str, &str)] = &[
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

const GEMMA3_BLOCK_NAMES: &[(&str, &str)] = &[
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// Undo llama.cpp's row permutation of q_proj/k_proj, in place on row-major `[rows, cols]` data.
///
/// llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) rewrites each weight as
/// `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)` with d = rows / n_head
/// (n_head = attention heads for q, KV heads for k), so that the two halves Hugging Face's
/// RoPE rotates together become adjacent rows. Per head h, with i < d/2 and j ∈ {0, 1}:
///
/// ```text
/// gguf[h·d + 2i + j] = hf[h·d + j·d/2 + i]      so      hf[h·d + j·d/2 + i] = gguf[h·d + 2i + j]
/// ```
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    if data.len() != rows * cols {
        return None;
    }
    Some(reorder_rows(data, cols, &unpermute_order(rows, n_head)?))
}

/// The rows of a row-major `[rows, cols]` matrix reordered: row `r` of the result is row
/// `order[r]` of `data` (with [`permute_order`] or [`unpermute_order`]).
pub fn reorder_rows(data: &[f32], cols: usize, order: &[usize]) -> Vec<f32> {
    order.iter().flat_map(|&r| data[r * cols..(r + 1) * cols].iter().copied()).collect()
}

/// The weights of a GGUF file under Hugging Face names: matrices as stored (or dequantised to
/// f32 where asked), put back in Hugging Face's form. LLaMA: llama.cpp's converter permuted the
/// q_proj/k_proj rows, undone here. Gemma 3: no permutation (its RoPE is the half-split one
/// llama.cpp calls NEOX), but every norm weight was stored as `1 + w`; the `w` of the Hugging
/// Face checkpoint is given back, which the model's norms use as `1 + w`.
pub struct GgufLlamaWeights<'a> {
    file: &'a GgufFile,
    /// `(heads, key/value heads)` whose q/k rows were permuted (LLaMA); `None`: not permuted.
    permuted: Option<(usize, usize)>,
    names: fn(&str) -> Option<String>,
    norm_shift: f32,
}

impl<'a> GgufLlamaWeights<'a> {
    /// A `general.architecture = "llama"` file.
    pub fn new(file: &'a GgufFile, n_head: usize, n_kv_head: usize) -> GgufLlamaWeights<'a> {
        GgufLlamaWeights { file, permuted: Some((n_head, n_kv_head)), names: llama_gguf_name, norm_shift: 0.0 }
    }

    /// A `general.architecture = "gemma3"` file.
    pub fn gemma3(file: &'a GgufFile) -> GgufLlamaWeights<'a> {
        GgufLlamaWeights { file, permuted: None, names: gemma3_gguf_name, norm_shift: 1.0 }
    }
}

impl Weights for GgufLlamaWeights<'_> {
    fn contains(&self, name: &str) -> bool {
        (self.names)(name).is_some_and(|g| self.file.contains(&g))
    }

    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let f = self.file;
        let g = (self.names)(name).ok_or_else(|| f.error(format!("no GGUF tensor corresponds to '{name}'")))?;
        let info = f.tensor_info(&g).ok_or_else(|| f.error(format!("missing tensor '{g}' (for '{name}', expected shape {shape:?})")))?;
        if info.shape() != shape {
            return Err(f.error(format!(
                "tensor '{g}' (for '{name}') has shape {:?} (ne {:?}), the config implies {shape:?}",
                info.shape(),
                info.ne
            )));
        }
        let mut data = f.dequantize(&g)?;
        if self.norm_shift != 0.0 && g.ends_with("norm.weight") {
            data.iter_mut().for_each(|x| *x -= self.norm_shift);
        }
        if let Some(n) = self.heads(&g) {
            let rows = shape.first().copied().unwrap_or(0);
            let cols = shape.get(1).copied().unwrap_or(1);
            data = unpermute_rows(&data, rows, cols, n)
                .ok_or_else(|| f.error(format!("tensor '{g}': {rows} rows do not split into {n} heads of an even size")))?;
        }
        Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
    }

    fn get_stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let f = self.file;
        let g = (self.names)(name).ok_or_else(|| f.error(format!("no GGUF tensor corresponds to '{name}'")))?;
        let Some(info) = f.tensor_info(&g) else { return self.get(name, shape, DType::F32, device) };
        let (ty, rows, cols) = (info.ty, shape.first().copied().unwrap_or(0), shape.get(1).copied().unwrap_or(1));
        let stored = match ty {
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            _ if shape.len() == 2 && crate::quant::QFormat::from_ggml(ty).is_some() => {
                if info.shape() != shape {
                    return self.get(name, shape, DType::F32, device);
                }
                let mut q = crate::quant::QMatrix::from_ggml(ty, rows, cols, f.tensor_bytes(&g)?.to_vec())
                    .map_err(|e| f.error(format!("tensor '{g}': {e}")))?;
                if let Some(n) = self.heads(&g) {
                    let order = unpermute_order(rows, n)
                        .ok_or_else(|| f.error(format!("tensor '{g}': {rows} rows do not split into {n} heads of an even size")))?;
                    q = q.permute_rows(&order).map_err(|e| f.error(format!("tensor '{g}': {e}")))?;
                }
                return Tensor::from_qmatrix(q, device);
            }
            _ => DType::F32,
        };
        self.get(name, shape, stored, device)
    }
}

impl GgufLlamaWeights<'_> {
    /// The heads whose rows llama.cpp's converter permuted (q and k projections).
    fn heads(&self, g: &str) -> Option<usize> {
        let (n_head, n_kv_head) = self.permuted?;
        if g.contains(".attn_q.") {
            Some(n_head)
        } else if g.contains(".attn_k.") {
            Some(n_kv_head)
        } else {
            None
        }
    }
}

/// The row order of llama.cpp's q/k permutation, as its converter writes a GGUF: row `r` of
/// the GGUF matrix is row `order[r]` of the Hugging Face one (the inverse of
/// [`unpermute_order`]): `gguf[h·d + 2i + j] = hf[h·d + j·d/2 + i]`.
pub fn permute_order(rows: usize, n_head: usize) -> Option<Vec<usize>> {
    let back = unpermute_order(rows, n_head)?;
    let mut order = vec![0; rows];
    for (hf, &g) in back.iter().enumerate() {
        order[g] = hf;
    }
    Some(order)
}

/// The row order that undoes llama.cpp's q/k permutation: row `i` of the result is row
/// `order[i]` of the stored matrix (the same map as [`unpermute_rows`]).
pub fn unpermute_order(rows: usize, n_head: usize) -> Option<Vec<usize>> {
    if n_head == 0 || rows % n_head != 0 || (rows / n_head) % 2 != 0 {
        return None;
    }
    let (d, half) = (rows / n_head, rows / n_head / 2);
    let mut order = vec![0; rows];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                order[h * d + j * half + i] = h * d + 2 * i + j;
            }
        }
    }
    Some(order)
}
