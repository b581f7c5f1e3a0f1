//! Writing GGUF files (version 3), the layout [`super::gguf`] reads: a header, the metadata in
//! the order it was added, the tensor directory, then each tensor's bytes at an offset that is
//! a multiple of the alignment (32).
//!
//! Tensors are produced one at a time while the file is written (a closure per tensor), so a
//! model is never held twice in memory. The file is written beside its destination and renamed
//! into place only when complete: an interrupted export leaves no half-written `.gguf`.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::quant::ggml::GgmlType;

use super::gguf::{GgufTokenizer, GgufValue, DEFAULT_ALIGNMENT};

type Producer<'a> = Box<dyn FnOnce() -> Result<Vec<u8>> + 'a>;

struct Pending<'a> {
    name: String,
    /// GGML order: `ne[0]` is the fastest axis (a PyTorch `[out, in]` weight is `[in, out]`).
    ne: Vec<u64>,
    ty: GgmlType,
    bytes: u64,
    data: Producer<'a>,
}

/// A GGUF file being put together: metadata and tensors, written by [`GgufWriter::write`].
#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<Pending<'a>>,
}

fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The value's bytes (without its type id); arrays must be of one element type.
fn put_value(out: &mut Vec<u8>, key: &str, v: &GgufValue) -> Result<()> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Array(items) => {
            // An empty array says "string": a reader needs the element type only to step over
            // the elements, and there are none.
            let ty = items.first().map_or(8, type_id);
            if let Some(bad) = items.iter().find(|i| type_id(i) != ty) {
                return Err(Error::InvalidArgument {
                    op: "gguf write",
                    msg: format!("metadata '{key}': an array mixes {} and {}", items[0].type_name(), bad.type_name()),
                });
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, key, i)?;
            }
        }
    }
    Ok(())
}

fn pad_to(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> GgufWriter<'a> {
        GgufWriter::default()
    }

    /// Set a metadata key (a key set twice keeps its first place and its last value).
    pub fn set(&mut self, key: impl Into<String>, value: GgufValue) {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
    }

    pub fn set_str(&mut self, key: &str, value: impl Into<String>) {
        self.set(key, GgufValue::String(value.into()));
    }

    pub fn set_u32(&mut self, key: &str, value: usize) -> Result<()> {
        let v = u32::try_from(value)
            .map_err(|_| Error::InvalidArgument { op: "gguf write", msg: format!("metadata '{key}' = {value} does not fit in a u32") })?;
        self.set(key, GgufValue::U32(v));
        Ok(())
    }

    /// Add a tensor of PyTorch `shape` (outermost axis first) stored as `ty`; `data` makes its
    /// bytes when the file is written and must return exactly `ty`'s size for that shape.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        ty: GgmlType,
        data: impl FnOnce() -> Result<Vec<u8>> + 'a,
    ) -> Result<()> {
        let name = name.into();
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        let bytes = ty.bytes_for(n).ok_or_else(|| Error::InvalidArgument {
            op: "gguf write",
            msg: format!("tensor '{name}' {shape:?}: {n} elements are not a whole number of {} blocks of {}", ty.name(), ty.block_size()),
        })?;
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::InvalidArgument { op: "gguf write", msg: format!("tensor '{name}' is added twice") });
        }
        let ne = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push(Pending { name, ne, ty, bytes, data: Box::new(data) });
        Ok(())
    }

    /// The tensors added so far: name, PyTorch shape and type.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, Vec<usize>, GgmlType)> {
        self.tensors.iter().map(|t| (t.name.as_str(), t.ne.iter().rev().map(|&d| d as usize).collect(), t.ty))
    }

    /// The tokenizer's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), as
    /// [`super::GgufFile::tokenizer`] reads it back.
    pub fn set_tokenizer(&mut self, t: &GgufTokenizer) -> Result<()> {
        let strings = |v: &[String]| GgufValue::Array(v.iter().map(|s| GgufValue::String(s.clone())).collect());
        self.set_str("tokenizer.ggml.model", t.model.clone());
        if let Some(pre) = &t.pre {
            self.set_str("tokenizer.ggml.pre", pre.clone());
        }
        self.set("tokenizer.ggml.tokens", strings(&t.tokens));
        if let Some(types) = &t.token_types {
            self.set("tokenizer.ggml.token_type", GgufValue::Array(types.iter().map(|&x| GgufValue::I32(x)).collect()));
        }
        if let Some(scores) = &t.scores {
            self.set("tokenizer.ggml.scores", GgufValue::Array(scores.iter().map(|&x| GgufValue::F32(x)).collect()));
        }
        if !t.merges.is_empty() {
            self.set("tokenizer.ggml.merges", strings(&t.merges));
        }
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", t.bos_id),
            ("tokenizer.ggml.eos_token_id", t.eos_id),
            ("tokenizer.ggml.padding_token_id", t.pad_id),
            ("tokenizer.ggml.unknown_token_id", t.unk_id),
        ] {
            if let Some(id) = id {
                self.set(key, GgufValue::U32(id));
            }
        }
        for (key, on) in [("tokenizer.ggml.add_bos_token", t.add_bos), ("tokenizer.ggml.add_eos_token", t.add_eos)] {
            if let Some(on) = on {
                self.set(key, GgufValue::Bool(on));
            }
        }
        if let Some(chat) = &t.chat_template {
            self.set_str("tokenizer.chat_template", chat.clone());
        }
        Ok(())
    }

    /// Write the file atomically (a temporary file beside `path`, renamed when complete).
    /// Returns the bytes written.
    pub fn write(self, path: &Path) -> Result<u64> {
        let align = DEFAULT_ALIGNMENT;
        let io = |e: std::io::Error| Error::Io { path: path.display().to_string(), msg: e.to_string() };
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut head, k);
            head.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut head, k, v)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = pad_to(offset + t.bytes, align);
        }
        head.resize(pad_to(head.len() as u64, align) as usize, 0);

        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| -> Result<u64> {
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io)?);
            f.write_all(&head).map_err(io)?;
            let mut written = head.len() as u64;
            for t in self.tensors {
                let data = (t.data)()?;
                if data.len() as u64 != t.bytes {
                    return Err(Error::InvalidArgument {
                        op: "gguf write",
                        msg: format!("tensor '{}': {} bytes made, {} expected for {}", t.name, data.len(), t.bytes, t.ty),
                    });
                }
                f.write_all(&data).map_err(io)?;
                let padded = pad_to(t.bytes, align);
                f.write_all(&vec![0u8; (padded - t.bytes) as usize]).map_err(io)?;
                written += padded;
            }
            let f = f.into_inner().map_err(|e| io(e.into_error()))?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, path).map_err(io)?;
            Ok(written)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::GgufFile;

    #[test]
    fn written_files_read_back() {
        let dir = std::env::temp_dir().join(format!("tinytune-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", "llama");
        w.set_u32("llama.block_count", 2).unwrap();
        w.set("x.floats", GgufValue::Array(vec![GgufValue::F32(1.5), GgufValue::F32(-2.0)]));
        w.set("x.empty", GgufValue::Array(vec![]));
        w.set("x.nested", GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::U8(7)])]));
        let x: Vec<f32> = (0..96).map(|i| i as f32 * 0.25 - 3.0).collect();
        let xc = x.clone();
        w.add_tensor("a", &[3, 32], GgmlType::Q8_0, move || {
            crate::quant::ggml::quantize(GgmlType::Q8_0, &xc).map_err(|m| Error::InvalidArgument { op: "t", msg: m })
        })
        .unwrap();
        w.add_tensor("b", &[5], GgmlType::F32, || Ok([1f32, 2., 3., 4., 5.].iter().flat_map(|v| v.to_le_bytes()).collect())).unwrap();
        assert!(w
            .add_tensor("c", &[3, 5], GgmlType::Q4_0, || Ok(vec![]))
            .unwrap_err()
            .to_string()
            .contains("not a whole number of Q4_0 blocks"));
        w.write(&path).unwrap();

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.get("general.architecture").and_then(|v| v.as_str()), Some("llama"));
        assert_eq!(f.usize("llama.block_count").unwrap(), 2);
        assert_eq!(f.get("x.floats"), Some(&GgufValue::Array(vec![GgufValue::F32(1.5), GgufValue::F32(-2.0)])));
        assert_eq!(f.get("x.empty").and_then(|v| v.as_array()).map(|a| a.len()), Some(0));
        assert_eq!(f.tensor_info("a").unwrap().shape(), vec![3, 32]);
        let a = f.dequantize("a").unwrap();
        let worst = a.iter().zip(&x).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= 0.09, "{worst} {:?}", &a[..8]);
        assert_eq!(f.dequantize("b").unwrap(), vec![1., 2., 3., 4., 5.]);
        assert_eq!(f.data_offset() % 32, 0);

        // A producer that fails leaves nothing behind, not even the temporary file.
        let path2 = dir.join("bad.gguf");
        let mut w = GgufWriter::new();
        w.add_tensor("x", &[4], GgmlType::F32, || Ok(vec![0u8; 3])).unwrap();
        assert!(w.write(&path2).unwrap_err().to_string().contains("3 bytes made, 16 expected"));
        assert!(!path2.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
