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

#[cfg(target_arch = "x86_64")]
pub(crate) mod dot_x86;
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

/// [`ggml::decode_into`] compiled for AVX2 and F16C: its per-format loops (inlined here)
/// convert codes to floats 8 lanes at a time instead of SSE2's 4.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_into_avx2(t: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match t {
        // The 4-bit formats by hand (the compiler's AVX2 code for their nibble split is slower
        // than its SSE2 code); Q8_0 (the only other caller) as its loop compiles for AVX2.
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (bs, ts) = (t.block_size(), t.type_size());
            for (x, c) in out.chunks_exact_mut(bs).zip(bytes.chunks_exact(ts)) {
                // SAFETY: this function runs only where AVX2, FMA and F16C are available.
                unsafe { ggml::x86::q4_block_avx2(c, x, t == GgmlType::Q4_1) }
            }
        }
        _ => {
            debug_assert!(t == GgmlType::Q8_0);
            for (x, c) in out.chunks_exact_mut(t.block_size()).zip(bytes.chunks_exact(t.type_size())) {
                ggml::q8_0_block(c, x);
            }
        }
    }
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

    /// `out[i] = W[row] · a[i]` for a few vectors `a` of `cols` values: the product of decoding
    /// a token. Each block of the row is decoded into registers (a stack block, never a row
    /// buffer) and multiplied as it is decoded, with eight partial sums per vector; on x86-64
    /// with AVX2 and FMA the whole loop is compiled for them (chosen at run time). Equal to
    /// the dot products of [`QMatrix::decode`]'s row within f32 rounding (another summation
    /// order).
    pub fn dot_row(&self, row: usize, a: &[&[f32]], out: &mut [f32]) {
        debug_assert!(row < self.rows && a.len() == out.len() && a.iter().all(|x| x.len() == self.cols));
        #[cfg(target_arch = "x86_64")]
        {
            if crate::backend::cpu::avx2() {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { self.dot_row_avx2(row, a, out) };
            }
        }
        self.dot_row_any::<false>(row, a, out)
    }

    /// [`QMatrix::dot_row`] compiled for AVX2, FMA and F16C: the 32-element GGML formats and NF4
    /// through the hand-written kernels of `dot_x86.rs`, the K-quants and int8 through the
    /// generic loop.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_row_avx2(&self, row: usize, a: &[&[f32]], out: &mut [f32]) {
        match (self.format, &self.scales) {
            (QFormat::Ggml(t), _) => {
                let (ts, nb) = (t.type_size(), self.cols / t.block_size());
                if dot_x86::dot_row(t, &self.data[row * nb * ts..(row + 1) * nb * ts], a, out) {
                    return;
                }
            }
            (QFormat::Nf4, Scales::Nf4(s)) => {
                let (nb, first) = (self.cols / nf4::BLOCK, row * (self.cols / nf4::BLOCK));
                let codes = &self.data[first * nf4::BLOCK / 2..(first + nb) * nf4::BLOCK / 2];
                return dot_x86::dot_row_nf4(codes, |g| s.get(first + g), a, out);
            }
            _ => {}
        }
        self.dot_row_any::<true>(row, a, out)
    }

    /// One loop per format with its block decoder inlined (the per-block call through a
    /// function pointer would cost as much as the decoding).
    #[inline(always)]
    fn dot_row_any<const FMA: bool>(&self, row: usize, a: &[&[f32]], out: &mut [f32]) {
        let f16 = ggml::f16_at;
        let nb = self.cols / self.format.block_size();
        let first = row * nb;
        match (self.format, &self.scales) {
            (QFormat::Ggml(t), _) => {
                let ts = t.type_size();
                let d = &self.data[first * ts..(first + nb) * ts];
                let at = |g: usize| &d[g * ts..(g + 1) * ts];
                match t {
                    GgmlType::Q8_0 => affine_dots::<32, FMA, false>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| {
                            let b = at(g);
                            ggml::q8_0_codes(b, o);
                            (f16(b, 0), 0.0)
                        },
                    ),
                    GgmlType::Q4_0 => affine_dots::<32, FMA, false>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| {
                            let b = at(g);
                            ggml::q4_0_codes(b, o);
                            (f16(b, 0), 0.0)
                        },
                    ),
                    GgmlType::Q4_1 => affine_dots::<32, FMA, true>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| {
                            let b = at(g);
                            ggml::q4_1_codes(b, o);
                            (f16(b, 0), f16(b, 2))
                        },
                    ),
                    GgmlType::Q5_0 => affine_dots::<32, FMA, false>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| {
                            let b = at(g);
                            ggml::q5_0_codes(b, o);
                            (f16(b, 0), 0.0)
                        },
                    ),
                    GgmlType::Q5_1 => affine_dots::<32, FMA, true>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| {
                            let b = at(g);
                            ggml::q5_1_codes(b, o);
                            (f16(b, 0), f16(b, 2))
                        },
                    ),
                    GgmlType::Q2_K => block_dots::<256, FMA>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| ggml::q2_k_block(at(g), o),
                    ),
                    GgmlType::Q3_K => block_dots::<256, FMA>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| ggml::q3_k_block(at(g), o),
                    ),
                    GgmlType::Q4_K => block_dots::<256, FMA>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| ggml::q4_k_block(at(g), o),
                    ),
                    GgmlType::Q5_K => block_dots::<256, FMA>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| ggml::q5_k_block(at(g), o),
                    ),
                    GgmlType::Q6_K => block_dots::<256, FMA>(
                        nb,
                        a,
                        out,
                        #[inline(always)]
                        |g, o| ggml::q6_k_block(at(g), o),
                    ),
                    _ => unreachable!("a QMatrix holds a decodable block format"),
                }
            }
            (QFormat::Nf4, Scales::Nf4(s)) => {
                let d = &self.data[first * nf4::BLOCK / 2..(first + nb) * nf4::BLOCK / 2];
                affine_dots::<{ nf4::BLOCK }, FMA, false>(
                    nb,
                    a,
                    out,
                    #[inline(always)]
                    |g, o| {
                        nf4::decode_block(&d[g * nf4::BLOCK / 2..(g + 1) * nf4::BLOCK / 2], 1.0, o);
                        (s.get(first + g), 0.0)
                    },
                )
            }
            (QFormat::Int8, Scales::Rows(s)) => {
                let d = &self.data[first * int8::BLOCK..(first + nb) * int8::BLOCK];
                affine_dots::<{ int8::BLOCK }, FMA, false>(
                    nb,
                    a,
                    out,
                    #[inline(always)]
                    |g, o| {
                        int8::decode(&d[g * int8::BLOCK..(g + 1) * int8::BLOCK], 1.0, o);
                        (s[row], 0.0)
                    },
                )
            }
            _ => unreachable!("QMatrix::quantize/from_ggml pair each format with its scales"),
        }
    }

    /// Elements `start .. start + out.len()` of row `row`, as f32. The whole blocks inside the
    /// range are decoded straight into `out` in one pass; a block cut by either end is decoded
    /// into a small stack buffer and the needed part copied.
    pub fn decode(&self, row: usize, start: usize, out: &mut [f32]) {
        debug_assert!(row < self.rows && start + out.len() <= self.cols);
        let bs = self.format.block_size();
        let end = start + out.len();
        // The whole blocks inside the range are `first..last`.
        let (first, last) = (start.next_multiple_of(bs), end / bs * bs);
        // A block cut by the range: decode all of it, keep `lo..hi` of the row.
        let part = |lo: usize, hi: usize, out: &mut [f32]| {
            let mut tmp = [0f32; 256];
            let b0 = lo / bs * bs;
            self.decode_blocks(row, b0 / bs, &mut tmp[..bs]);
            out.copy_from_slice(&tmp[lo - b0..hi - b0]);
        };
        if first > last {
            // Inside one block.
            return part(start, end, out);
        }
        if start < first {
            part(start, first, &mut out[..first - start]);
        }
        if first < last {
            self.decode_blocks(row, first / bs, &mut out[first - start..last - start]);
        }
        if last < end {
            part(last, end, &mut out[last - start..]);
        }
    }

    /// Whole blocks `blk, blk + 1, …` of row `row` into `out` (a multiple of the block size):
    /// the GGML formats in one pass over the row's bytes, compiled for AVX2 where that
    /// measured faster; NF4 and int8 block by block with their scales.
    fn decode_blocks(&self, row: usize, blk: usize, out: &mut [f32]) {
        let bs = self.format.block_size();
        debug_assert!(out.len() % bs == 0);
        if let QFormat::Ggml(t) = self.format {
            let ts = t.type_size();
            let at = (row * (self.cols / bs) + blk) * ts;
            let bytes = &self.data[at..at + out.len() / bs * ts];
            #[cfg(target_arch = "x86_64")]
            {
                // Where compiling for AVX2 measured faster (benches/ops dequant_rows: Q4_0
                // 2.7 → 12.3, Q4_1 2.4 → 8.6, Q8_0 5.9 → 9.8 G values/s on one Zen 4 core;
                // Q5_0 and Q6_K were slower that way, Q4_K the same).
                if crate::backend::cpu::avx2() && matches!(t, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked once at run time).
                    return unsafe { decode_into_avx2(t, bytes, out) };
                }
            }
            return ggml::decode_into(t, bytes, out);
        }
        for (i, o) in out.chunks_exact_mut(bs).enumerate() {
            let g = row * (self.cols / bs) + blk + i;
            match (&self.format, &self.scales) {
                (QFormat::Nf4, Scales::Nf4(a)) => nf4::decode_block(&self.data[g * bs / 2..(g + 1) * bs / 2], a.get(g), o),
                (QFormat::Int8, Scales::Rows(s)) => int8::decode(&self.data[g * bs..(g + 1) * bs], s[row], o),
                _ => unreachable!("QMatrix::quantize/from_ggml pair each format with its scales"),
            }
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
    /// `Keep`, except that on a GPU whose adapter has `SHADER_F16` the f32 matrices become f16
    /// (half the bytes every product reads; quantised and 16-bit ones stay as stored).
    #[default]
    Auto,
    /// As stored: GGUF blocks stay quantised, f16/bf16 checkpoints stay 16-bit, f32 stays f32.
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
    pub const NAMES: &'static str = "auto, keep, f32, f16, bf16, nf4, int8";

    pub fn from_name(name: &str) -> Option<BaseDType> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => BaseDType::Auto,
            "keep" => BaseDType::Keep,
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
            BaseDType::Auto => "auto",
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

    /// Every format: a matrix of random blocks (random code bytes, f16 scales of a sane size).
    fn random_matrices(rows: usize, cols: usize) -> Vec<QMatrix> {
        let mut out = Vec::new();
        for t in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let (bs, ts) = (t.block_size(), t.type_size());
            let noise = sample(rows * cols / bs * ts, t.id() as u64);
            let mut bytes: Vec<u8> = noise.iter().map(|v| (v.to_bits() >> 7) as u8).collect();
            let fields: &[usize] = match t {
                GgmlType::Q2_K => &[80, 82],
                GgmlType::Q3_K => &[108],
                GgmlType::Q6_K => &[208],
                GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
                _ => &[0, 2],
            };
            for (b, blk) in bytes.chunks_mut(ts).enumerate() {
                for &at in fields {
                    let v = half::f16::from_f32(0.01 + 0.02 * noise[b].abs()).to_bits().to_le_bytes();
                    blk[at..at + 2].copy_from_slice(&v);
                }
            }
            out.push(QMatrix::from_ggml(t, rows, cols, bytes).unwrap());
        }
        let dense = sample(rows * cols, 99);
        out.push(QMatrix::quantize(QFormat::Nf4, rows, cols, &dense).unwrap());
        out.push(QMatrix::quantize(QFormat::Int8, rows, cols, &dense).unwrap());
        out
    }

    #[test]
    fn fused_dot_products_equal_the_decoded_rows_in_float64() {
        // Every format, 1 to 6 vectors (the kernels take up to four per pass), through the
        // path this CPU runs (`dot_row`: AVX2 kernels where present) and the portable one.
        let (rows, cols) = (3, 512);
        for q in random_matrices(rows, cols) {
            let dense = q.dequantize();
            for m in 1..=6 {
                let a: Vec<Vec<f32>> = (0..m).map(|i| sample(cols, 1000 + i as u64)).collect();
                let refs: Vec<&[f32]> = a.iter().map(|v| v.as_slice()).collect();
                for row in 0..rows {
                    let (mut fast, mut portable) = (vec![f32::NAN; m], vec![f32::NAN; m]);
                    q.dot_row(row, &refs, &mut fast);
                    q.dot_row_any::<false>(row, &refs, &mut portable);
                    for i in 0..m {
                        let terms = dense[row * cols..(row + 1) * cols].iter().zip(&a[i]).map(|(&w, &x)| w as f64 * x as f64);
                        let want: f64 = terms.clone().sum();
                        let size: f64 = terms.map(f64::abs).sum();
                        for (path, got) in [("dot_row", fast[i]), ("portable", portable[i])] {
                            assert!(
                                (got as f64 - want).abs() <= 1e-6 * size,
                                "{} row {row} vector {i}/{m} ({path}): {got} vs {want}",
                                q.format()
                            );
                        }
                    }
                }
            }
        }
    }

    /// `decode` of any range of a row — whole blocks, cut blocks alone, whole blocks between a
    /// cut head and tail — equals the row of the full dequantisation, and for the GGML formats
    /// equals the scalar reference decoder (`ggml::dequantize`, never compiled for AVX2), also
    /// for Q4_1 (its own AVX2 routine) and the 256-value blocks of Q4_K.
    #[test]
    fn decode_of_any_segment_equals_the_full_dequantisation() {
        // GGML blocks from stored bytes: random codes with small finite f16 scales.
        let stored = |t: GgmlType, rows: usize, cols: usize| -> QMatrix {
            let (bs, ts) = (t.block_size(), t.type_size());
            let mut bytes: Vec<u8> = sample(rows * cols / bs * ts, 11).iter().map(|x| (x.to_bits() >> 7) as u8).collect();
            for block in bytes.chunks_exact_mut(ts) {
                // d and the second f16 (Q4_1's min, Q4_K's dmin) lead the block.
                block[..2].copy_from_slice(&half::f16::from_f32(0.037).to_le_bytes());
                block[2..4].copy_from_slice(&half::f16::from_f32(-0.21).to_le_bytes());
            }
            QMatrix::from_ggml(t, rows, cols, bytes).unwrap()
        };
        let q = |f: QFormat, cols: usize| QMatrix::quantize(f, 3, cols, &sample(3 * cols, 7)).unwrap();
        let matrices = [
            q(QFormat::Nf4, 192),
            q(QFormat::Int8, 192),
            q(QFormat::Ggml(GgmlType::Q8_0), 192),
            q(QFormat::Ggml(GgmlType::Q4_0), 192),
            stored(GgmlType::Q4_1, 3, 192),
            stored(GgmlType::Q4_K, 3, 512),
        ];
        for m in &matrices {
            let cols = m.cols();
            let full = m.dequantize();
            let reference = match m.format() {
                QFormat::Ggml(t) => {
                    let mut out = vec![0f32; m.rows() * cols];
                    ggml::dequantize(t, m.data(), &mut out).unwrap();
                    assert_eq!(full, out, "{}: dequantize against the scalar decoder", m.format());
                    out
                }
                _ => full.clone(),
            };
            let mut ranges =
                vec![(0, cols), (5, 1), (31, 40), (64, 64), (100, 92), (cols - 1, 1), (0, 0), (16, 160), (33, 150), (1, cols - 2)];
            if cols == 512 {
                ranges.extend([(1, 510), (100, 300), (255, 2), (256, 256)]);
            }
            for (start, len) in ranges {
                let mut out = vec![f32::NAN; len];
                m.decode(2, start, &mut out);
                assert_eq!(out, reference[2 * cols + start..2 * cols + start + len], "{} {start}+{len}", m.format());
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

/// [`block_dots`] for a format whose block g holds `d_g · q + m_g`: `codes(g, buf)` writes
/// the codes q and returns (d_g, m_g), and the block adds `d_g · Σ q·y + m_g · Σ y` — one
/// multiply-add per element instead of three (the decode's scale and offset folded out of the
/// element loop).
#[inline(always)]
fn affine_dots<const BS: usize, const FMA: bool, const OFFSET: bool>(
    nb: usize,
    a: &[&[f32]],
    out: &mut [f32],
    codes: impl Fn(usize, &mut [f32; BS]) -> (f32, f32),
) {
    #[inline(always)]
    fn fma<const FMA: bool>(w: f32, v: f32, s: f32) -> f32 {
        if FMA {
            w.mul_add(v, s)
        } else {
            s + w * v
        }
    }
    #[inline(always)]
    fn pass<const BS: usize, const FMA: bool, const OFFSET: bool, const M: usize>(
        nb: usize,
        a: &[&[f32]],
        out: &mut [f32],
        codes: &impl Fn(usize, &mut [f32; BS]) -> (f32, f32),
    ) {
        // Per vector: the scaled sums d·Σq·y and, with an offset, m·Σy (two chains).
        let mut acc = [[[0f32; 8]; 2]; M];
        let mut buf = [0f32; BS];
        for g in 0..nb {
            let (d, m) = codes(g, &mut buf);
            for i in 0..M {
                let x: &[f32; BS] = a[i][g * BS..(g + 1) * BS].try_into().expect("whole blocks");
                let (mut qy, mut y) = ([0f32; 8], [0f32; 8]);
                for c in 0..BS / 8 {
                    for l in 0..8 {
                        qy[l] = fma::<FMA>(buf[c * 8 + l], x[c * 8 + l], qy[l]);
                        if OFFSET {
                            y[l] += x[c * 8 + l];
                        }
                    }
                }
                let [sd, sm] = &mut acc[i];
                for l in 0..8 {
                    sd[l] = fma::<FMA>(d, qy[l], sd[l]);
                    if OFFSET {
                        sm[l] = fma::<FMA>(m, y[l], sm[l]);
                    }
                }
            }
        }
        for i in 0..M {
            out[i] = acc[i].iter().flatten().sum();
        }
    }
    for (a, out) in a.chunks(4).zip(out.chunks_mut(4)) {
        match a.len() {
            1 => pass::<BS, FMA, OFFSET, 1>(nb, a, out, &codes),
            2 => pass::<BS, FMA, OFFSET, 2>(nb, a, out, &codes),
            3 => pass::<BS, FMA, OFFSET, 3>(nb, a, out, &codes),
            _ => pass::<BS, FMA, OFFSET, 4>(nb, a, out, &codes),
        }
    }
}

/// (Kept apart from [`affine_dots`] with d = 1, m = 0: written that way the K-quants' one-token
/// products measured 30% slower, 13 against 19 GFLOP/s, `cargo bench --bench ops -- decode`.)
///
/// `out[i] = Σ_g block_g · a[i][g·BS ..]` over `nb` blocks of `BS` values, `decode(g, buf)`
/// writing block g: 32 partial sums per vector — four independent chains of eight lanes, so
/// the products vectorise and do not wait on one another (fused multiply-adds when `FMA`, the
/// caller compiled for them) — and up to four vectors per pass over the blocks, their count a
/// constant so the partial sums stay in registers.
#[inline(always)]
fn block_dots<const BS: usize, const FMA: bool>(nb: usize, a: &[&[f32]], out: &mut [f32], decode: impl Fn(usize, &mut [f32; BS])) {
    #[inline(always)]
    fn pass<const BS: usize, const FMA: bool, const M: usize>(
        nb: usize,
        a: &[&[f32]],
        out: &mut [f32],
        decode: &impl Fn(usize, &mut [f32; BS]),
    ) {
        let mut acc = [[0f32; 32]; M];
        let mut buf = [0f32; BS];
        for g in 0..nb {
            decode(g, &mut buf);
            for i in 0..M {
                let x: &[f32; BS] = a[i][g * BS..(g + 1) * BS].try_into().expect("whole blocks");
                for c in 0..BS / 8 {
                    for l in 0..8 {
                        let (w, v, s) = (buf[c * 8 + l], x[c * 8 + l], &mut acc[i][(c % 4) * 8 + l]);
                        *s = if FMA { w.mul_add(v, *s) } else { *s + w * v };
                    }
                }
            }
        }
        for i in 0..M {
            out[i] = acc[i].iter().sum();
        }
    }
    for (a, out) in a.chunks(4).zip(out.chunks_mut(4)) {
        match a.len() {
            1 => pass::<BS, FMA, 1>(nb, a, out, &decode),
            2 => pass::<BS, FMA, 2>(nb, a, out, &decode),
            3 => pass::<BS, FMA, 3>(nb, a, out, &decode),
            _ => pass::<BS, FMA, 4>(nb, a, out, &decode),
        }
    }
}
