//! Frozen weights kept in the bytes they are stored in: the GGUF block formats ([`ggml`]), NF4
//! with double-quantised scales ([`nf4`], QLoRA) and int8 with one scale per row ([`int8`]).
//!
//! A [`QMatrix`] is a `rows × cols` matrix (PyTorch `nn.Linear` layout `[out, in]`, or an
//! embedding table `[vocab, dim]`) whose rows are runs of blocks along `cols`. Nothing turns it
//! into a full f32 copy on the hot paths: the matrix product reads it one row segment at a
//! time through [`QMatrix::decode`] (the CPU GEMM decodes a block straight into its packing
//! buffer, see `backend::cpu::gemm`), and an embedding lookup decodes only the rows it picks.
//!
//! A tensor holds one as its storage with dtype [`crate::DType::Quant`]; `to_dtype(F32)`
//! dequantises (for merges and exports), `t()` and reshapes are views, a product
//! `x · Wᵀ` or `g · W` works in both operand orders (forward and the `dx` of backward), and
//! a quantised tensor never takes a gradient.
//!
//! Adding a format is one variant of [`QFormat`], its block decoder, and its tests: the kernels
//! only ever call [`QMatrix::decode`].

pub mod ggml;
pub mod int8;
pub mod nf4;

pub use ggml::GgmlType;

/// How a quantised matrix stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QFormat {
    /// A GGML block format as stored in GGUF (`Q4_0` … `Q6_K`; not the element types).
    Ggml(GgmlType),
    /// 4-bit NormalFloat, blocks of 64 with an absmax each, the absmaxes double-quantised to
    /// 8 bits in blocks of 256 (QLoRA, as bitsandbytes' `quantize_4bit(quant_type="nf4",
    /// compress_statistics=True)`).
    Nf4,
    /// int8 with one absmax scale per row (`x = q · absmax/127`).
    Int8,
}

impl QFormat {
    /// A short name (`"Q4_1"`, `"nf4"`, `"int8"`).
    pub fn name(self) -> &'static str {
        match self {
            QFormat::Ggml(t) => t.name(),
            QFormat::Nf4 => "nf4",
            QFormat::Int8 => "int8",
        }
    }

    /// Elements per block: a row segment decodes at this granularity, and `cols` must be a
    /// multiple of it.
    pub fn block_size(self) -> usize {
        match self {
            QFormat::Ggml(t) => t.block_size(),
            QFormat::Nf4 => nf4::BLOCK,
            QFormat::Int8 => int8::BLOCK,
        }
    }

    /// The code `shaders/weights.wgsl` knows the format by (its `W_FORMAT`): NF4 3, int8 4,
    /// a GGML block format 100 + its GGML type id (0–2 are the dense f32, f16, bf16).
    pub fn gpu_code(self) -> u32 {
        match self {
            QFormat::Nf4 => 3,
            QFormat::Int8 => 4,
            QFormat::Ggml(t) => 100 + t.id(),
        }
    }

    pub fn from_gpu_code(code: u32) -> Option<QFormat> {
        match code {
            3 => Some(QFormat::Nf4),
            4 => Some(QFormat::Int8),
            c => QFormat::from_ggml(GgmlType::from_id(c.checked_sub(100)?)?),
        }
    }

    /// Whether a GGML type is a block format kept as a [`QMatrix`] (not F32/F16/BF16, which
    /// are plain tensors, nor a type tinytune cannot decode).
    pub fn from_ggml(t: GgmlType) -> Option<QFormat> {
        ggml::block_decoder(t).map(|_| QFormat::Ggml(t))
    }
}

impl std::fmt::Display for QFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Words before the blocks in a quantised matrix's GPU copy ([`QMatrix::to_gpu_words`]).
pub const GPU_HEADER: usize = 8;

/// The side data of a format whose scales live outside its blocks.
#[derive(Debug, Clone, PartialEq)]
enum Scales {
    /// The GGML formats carry their scales inside each block.
    InBlock,
    /// NF4: the double-quantised absmax of every block of 64.
    Nf4(nf4::Absmax),
    /// int8: one f32 scale (`absmax/127`) per row.
    Rows(Vec<f32>),
}

/// A quantised `rows × cols` matrix (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct QMatrix {
    format: QFormat,
    rows: usize,
    cols: usize,
    /// The blocks, row after row: GGML blocks as stored; NF4 nibbles (two per byte, the even
    /// element in the high nibble, as bitsandbytes packs them); int8 values.
    data: Vec<u8>,
    scales: Scales,
}

fn check_cols(format: QFormat, rows: usize, cols: usize) -> Result<(), String> {
    let bs = format.block_size();
    if cols % bs != 0 {
        return Err(format!("{format} stores rows in blocks of {bs}, but a row has {cols} elements (shape [{rows}, {cols}])"));
    }
    Ok(())
}

impl QMatrix {
    /// A GGML block-format matrix from its stored bytes (row-major, `rows · cols/block`
    /// blocks). Errors name the format and the shape when the sizes do not fit.
    pub fn from_ggml(ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Result<QMatrix, String> {
        let format = QFormat::from_ggml(ty)
            .ok_or_else(|| format!("tensor type {ty} is not a block format tinytune keeps quantised ({})", ggml::SUPPORTED))?;
        check_cols(format, rows, cols)?;
        let want = (rows * cols / ty.block_size()) * ty.type_size();
        if data.len() != want {
            return Err(format!("[{rows}, {cols}] in {ty} takes {want} bytes, got {}", data.len()));
        }
        Ok(QMatrix { format, rows, cols, data, scales: Scales::InBlock })
    }

    /// Quantise a row-major f32 matrix to `format` (NF4, int8, or the GGML formats tinytune
    /// writes: Q8_0, Q4_0).
    pub fn quantize(format: QFormat, rows: usize, cols: usize, x: &[f32]) -> Result<QMatrix, String> {
        check_cols(format, rows, cols)?;
        if x.len() != rows * cols {
            return Err(format!("{} values do not fill [{rows}, {cols}]", x.len()));
        }
        let (data, scales) = match format {
            QFormat::Nf4 => {
                let (codes, absmax) = nf4::quantize(x);
                (codes, Scales::Nf4(absmax))
            }
            QFormat::Int8 => {
                let (q, s) = int8::quantize(x, cols);
                (q, Scales::Rows(s))
            }
            QFormat::Ggml(t) => (ggml::quantize(t, x)?, Scales::InBlock),
        };
        Ok(QMatrix { format, rows, cols, data, scales })
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored blocks (GGML bytes as in a GGUF file, NF4 nibbles, int8 values).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Bytes the matrix takes in memory, side data included.
    pub fn bytes(&self) -> usize {
        self.data.len()
            + match &self.scales {
                Scales::InBlock => 0,
                Scales::Nf4(a) => a.bytes(),
                Scales::Rows(s) => 4 * s.len(),
            }
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `order[i]`.
    pub fn permute_rows(&self, order: &[usize]) -> Result<QMatrix, String> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(format!("a row order of {} entries for a matrix of {} rows", order.len(), self.rows));
        }
        if self.format == QFormat::Nf4 {
            // The absmaxes are double-quantised across rows: re-quantising would change them,
            // so reorder the decoded values (exact) and quantise again only if that is lossless.
            return Err("NF4 matrices are quantised after the rows are in place, not reordered".into());
        }
        let row_bytes = self.data.len() / self.rows.max(1);
        let mut data = Vec::with_capacity(self.data.len());
        for &r in order {
            data.extend_from_slice(&self.data[r * row_bytes..(r + 1) * row_bytes]);
        }
        let scales = match &self.scales {
            Scales::Rows(s) => Scales::Rows(order.iter().map(|&r| s[r]).collect()),
            other => other.clone(),
        };
        Ok(QMatrix { data, scales, ..self.clone() })
    }

    /// Decode block `blk` of row `row` into `out` (`block_size()` values).
    fn decode_block(&self, row: usize, blk: usize, out: &mut [f32]) {
        let bs = self.format.block_size();
        let g = row * (self.cols / bs) + blk;
        match (&self.format, &self.scales) {
            (QFormat::Ggml(t), _) => {
                let ts = t.type_size();
                let decode = ggml::block_decoder(*t).expect("a QMatrix holds a decodable block format");
                decode(&self.data[g * ts..(g + 1) * ts], out);
            }
            (QFormat::Nf4, Scales::Nf4(a)) => nf4::decode_block(&self.data[g * bs / 2..(g + 1) * bs / 2], a.get(g), out),
            (QFormat::Int8, Scales::Rows(s)) => int8::decode(&self.data[g * bs..(g + 1) * bs], s[row], out),
            _ => unreachable!("QMatrix::quantize/from_ggml pair each format with its scales"),
        }
    }

    /// Elements `start .. start + out.len()` of row `row`, as f32. Whole blocks are decoded
    /// straight into `out`; a block cut by either end goes through a small stack buffer.
    pub fn decode(&self, row: usize, start: usize, out: &mut [f32]) {
        debug_assert!(row < self.rows && start + out.len() <= self.cols);
        let bs = self.format.block_size();
        let end = start + out.len();
        if let QFormat::Ggml(t) = self.format {
            if start % bs == 0 && end % bs == 0 {
                // Whole blocks: one pass over the row's bytes.
                let ts = t.type_size();
                let at = (row * (self.cols / bs) + start / bs) * ts;
                ggml::decode_into(t, &self.data[at..at + out.len() / bs * ts], out);
                return;
            }
        }
        let mut col = start;
        while col < end {
            let blk = col / bs;
            let b0 = blk * bs;
            let take = (b0 + bs).min(end) - col;
            let o = &mut out[col - start..col - start + take];
            if col == b0 && take == bs {
                self.decode_block(row, blk, o);
            } else {
                let mut tmp = [0f32; 256];
                self.decode_block(row, blk, &mut tmp[..bs]);
                o.copy_from_slice(&tmp[col - b0..col - b0 + take]);
            }
            col += take;
        }
    }

    /// The words a GPU holds this matrix in, as `shaders/weights.wgsl` reads it: a header of
    /// [`GPU_HEADER`] words `[format code, rows, cols, side, nf4 scales, nf4 codes, data bytes, 0]`,
    /// the blocks as stored (byte `b` is byte `b % 4` of word `GPU_HEADER + b / 4`), then from
    /// word `side` the side data: int8 one f32 scale per row; NF4 the mean `offset`, the 256
    /// values of the dynamic code, from word `nf4 scales` one f32 per 256 blocks, and from
    /// word `nf4 codes` the 8-bit scale codes, four per word. Nothing is decoded: the GPU
    /// copy takes the bytes the CPU one does, plus 1 KiB of code table for NF4.
    pub fn to_gpu_words(&self) -> Vec<u32> {
        fn bytes_to_words(b: &[u8], out: &mut Vec<u32>) {
            out.extend(b.chunks(4).map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_le_bytes(w)
            }));
        }
        let mut w = vec![0u32; GPU_HEADER];
        bytes_to_words(&self.data, &mut w);
        let side = w.len();
        let (mut scales_at, mut codes_at) = (0, 0);
        match &self.scales {
            Scales::InBlock => {}
            Scales::Rows(s) => w.extend(s.iter().map(|v| v.to_bits())),
            Scales::Nf4(a) => {
                w.push(a.offset.to_bits());
                w.extend(nf4::dynamic_code().iter().map(|v| v.to_bits()));
                scales_at = w.len();
                w.extend(a.scale.iter().map(|v| v.to_bits()));
                codes_at = w.len();
                bytes_to_words(&a.q, &mut w);
            }
        }
        let head = [
            self.format.gpu_code(),
            self.rows as u32,
            self.cols as u32,
            side as u32,
            scales_at as u32,
            codes_at as u32,
            self.data.len() as u32,
            0,
        ];
        w[..GPU_HEADER].copy_from_slice(&head);
        w
    }

    /// The matrix back from the words of [`QMatrix::to_gpu_words`] (a read back from the GPU).
    pub fn from_gpu_words(w: &[u32]) -> Result<QMatrix, String> {
        let bad = || format!("not a quantised matrix's GPU words ({} words)", w.len());
        let word = |i: usize| w.get(i).copied().map(|v| v as usize).ok_or_else(bad);
        let format = QFormat::from_gpu_code(word(0)? as u32).ok_or_else(bad)?;
        let (rows, cols, side, scales_at, codes_at, n) = (word(1)?, word(2)?, word(3)?, word(4)?, word(5)?, word(6)?);
        let bytes = |from: usize, len: usize| -> Result<Vec<u8>, String> {
            let words = w.get(from..from + len.div_ceil(4)).ok_or_else(bad)?;
            Ok(words.iter().flat_map(|v| v.to_le_bytes()).take(len).collect())
        };
        let floats = |from: usize, len: usize| -> Result<Vec<f32>, String> {
            Ok(w.get(from..from + len).ok_or_else(bad)?.iter().map(|&v| f32::from_bits(v)).collect())
        };
        let data = bytes(GPU_HEADER, n)?;
        let scales = match format {
            QFormat::Ggml(_) => Scales::InBlock,
            QFormat::Int8 => Scales::Rows(floats(side, rows)?),
            QFormat::Nf4 => {
                let blocks = rows * cols / nf4::BLOCK;
                let offset = floats(side, 1)?[0];
                let scale = floats(scales_at, blocks.div_ceil(nf4::SCALE_BLOCK))?;
                Scales::Nf4(nf4::Absmax { q: bytes(codes_at, blocks)?, scale, offset })
            }
        };
        check_cols(format, rows, cols)?;
        Ok(QMatrix { format, rows, cols, data, scales })
    }

    /// The whole matrix as row-major f32 (for merges, exports and tests; the kernels never
    /// need it).
    pub fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.par_chunks_mut(self.cols).enumerate().for_each(|(r, o)| self.decode(r, 0, o));
        }
        out
    }
}

/// The frozen-weight policy of a model load (`--base-dtype`): which type the linear weights of
/// the blocks (and the embedding table, for `keep`) are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseDType {
    /// As stored: GGUF blocks stay quantised, f16/bf16 checkpoints stay 16-bit, f32 stays f32.
    #[default]
    Keep,
    F32,
    F16,
    BF16,
    /// Quantise the block linears to NF4 (QLoRA); embeddings and norms stay as stored.
    Nf4,
    /// Quantise the block linears to int8 (one scale per row).
    Int8,
}

impl BaseDType {
    pub const NAMES: &'static str = "keep, f32, f16, bf16, nf4, int8";

    pub fn from_name(name: &str) -> Option<BaseDType> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "keep" | "" => BaseDType::Keep,
            "f32" | "float32" => BaseDType::F32,
            "f16" | "float16" => BaseDType::F16,
            "bf16" | "bfloat16" => BaseDType::BF16,
            "nf4" => BaseDType::Nf4,
            "int8" => BaseDType::Int8,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            BaseDType::Keep => "keep",
            BaseDType::F32 => "f32",
            BaseDType::F16 => "f16",
            BaseDType::BF16 => "bf16",
            BaseDType::Nf4 => "nf4",
            BaseDType::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for BaseDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        BaseDType::from_name(s).ok_or_else(|| format!("unknown base dtype {s:?}; expected one of {}", BaseDType::NAMES))
    }
}

impl<'de> serde::Deserialize<'de> for BaseDType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    #[test]
    fn decode_of_any_segment_equals_the_full_dequantisation() {
        for format in [QFormat::Nf4, QFormat::Int8, QFormat::Ggml(GgmlType::Q8_0), QFormat::Ggml(GgmlType::Q4_0)] {
            let (rows, cols) = (3, 192);
            let m = QMatrix::quantize(format, rows, cols, &sample(rows * cols, 7)).unwrap();
            let full = m.dequantize();
            for (start, len) in [(0, 192), (5, 1), (31, 40), (64, 64), (100, 92), (191, 1), (0, 0)] {
                let mut out = vec![f32::NAN; len];
                m.decode(2, start, &mut out);
                assert_eq!(out, full[2 * cols + start..2 * cols + start + len], "{format} {start}+{len}");
            }
        }
    }

    #[test]
    fn bad_shapes_name_the_format_and_the_shape() {
        let e = QMatrix::quantize(QFormat::Nf4, 2, 48, &[0.0; 96]).unwrap_err();
        assert!(e.contains("nf4") && e.contains("blocks of 64") && e.contains("[2, 48]"), "{e}");
        let e = QMatrix::from_ggml(GgmlType::Q4_1, 2, 32, vec![0; 39]).unwrap_err();
        assert!(e.contains("Q4_1") && e.contains("40 bytes"), "{e}");
        assert!(QMatrix::from_ggml(GgmlType::F16, 1, 32, vec![0; 64]).unwrap_err().contains("not a block format"));
        assert_eq!("NF4".parse::<BaseDType>(), Ok(BaseDType::Nf4));
        assert!("q4".parse::<BaseDType>().unwrap_err().contains("keep, f32, f16, bf16, nf4, int8"));
    }

    #[test]
    fn permuted_rows_decode_as_the_rows_they_came_from() {
        let m = QMatrix::quantize(QFormat::Int8, 4, 32, &sample(128, 3)).unwrap();
        let p = m.permute_rows(&[2, 0, 3, 1]).unwrap();
        let (a, b) = (m.dequantize(), p.dequantize());
        assert_eq!(b[..32], a[64..96]);
        assert_eq!(b[96..], a[32..64]);
    }
}
