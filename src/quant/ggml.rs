//! GGML tensor types, as stored in GGUF files, and their dequantisation to f32.
//!
//! A GGML tensor is a sequence of *blocks* along its fastest axis (`ne[0]`); a block of
//! `block_size` elements takes `type_size` bytes, so a row of `ne[0]` elements (a whole number
//! of blocks) takes `ne[0] / block_size · type_size` bytes. All values are little-endian. The
//! block formats tinytune dequantises (layouts from the GGML/llama.cpp sources, `ggml-common.h`,
//! and gguf-py's `quants.py`, which the tests compare against):
//!
//! | type | block | bytes | layout                                   | element i                    |
//! |------|-------|-------|------------------------------------------|------------------------------|
//! | F32  | 1     | 4     | IEEE binary32                            | x                            |
//! | F16  | 1     | 2     | IEEE binary16                            | x                            |
//! | BF16 | 1     | 2     | bfloat16 (the top 16 bits of an f32)     | x                            |
//! | Q8_0 | 32    | 34    | f16 `d`, then 32 × i8 `q`                | d · q[i]                     |
//! | Q4_0 | 32    | 18    | f16 `d`, then 16 bytes of nibbles        | d · (q[i] − 8), q ∈ 0..16    |
//! | Q4_1 | 32    | 20    | f16 `d`, f16 `m`, then 16 bytes of nibbles | d · q[i] + m, q ∈ 0..16    |
//!
//! Nibble order (Q4_0, Q4_1): byte j (0..16) of `qs` holds element j in its low nibble and
//! element j + 16 in its high nibble: `q[j] = qs[j] & 0xF`, `q[j + 16] = qs[j] >> 4`.
//! Each product is computed in f32 (`d` converted from f16 first), as ggml and gguf-py do, so
//! the results are bit-identical to theirs.

use half::f16;
use rayon::prelude::*;

/// A GGML tensor type id with its block geometry. Every id GGML defines is known (so a file's
/// byte ranges can be checked whatever it holds); [`GgmlType::can_dequantize`] says which ones
/// tinytune can turn into f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(u32);

/// (id, name, elements per block, bytes per block): the GGML type table (ggml.h / gguf-py
/// `GGML_QUANT_SIZES`). Ids 4, 5 (removed Q4_2/Q4_3) and 31–33, 36–38 (removed or repacked
/// layouts) are unknown.
const TABLE: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

fn entry(id: u32) -> &'static (u32, &'static str, usize, usize) {
    TABLE.iter().find(|e| e.0 == id).expect("GgmlType is only built from ids in TABLE")
}

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    /// The type with this id, or `None` for an id GGML does not define.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().any(|e| e.0 == id).then_some(GgmlType(id))
    }

    pub fn id(self) -> u32 {
        self.0
    }

    /// GGML's name for the type (`"Q4_1"`).
    pub fn name(self) -> &'static str {
        entry(self.0).1
    }

    /// Elements per block (1 for plain floats and ints).
    pub fn block_size(self) -> usize {
        entry(self.0).2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        entry(self.0).3
    }

    /// Whether [`dequantize`] reads this type.
    pub fn can_dequantize(self) -> bool {
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1)
    }

    /// Bytes taken by `n` elements, or `None` when `n` is not a whole number of blocks or the
    /// size overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if n % bs != 0 {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q8_0 block (34 bytes → 32 values): `x[i] = d · q[i]`.
fn q8_0_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = d * (q as i8) as f32;
    }
}

/// Q4_0 block (18 bytes → 32 values): `x[i] = d · (q[i] − 8)`.
fn q4_0_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = out.split_at_mut(16);
    for (j, &byte) in b[2..18].iter().enumerate() {
        lo[j] = d * ((byte & 0x0F) as i32 - 8) as f32;
        hi[j] = d * ((byte >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1 block (20 bytes → 32 values): `x[i] = d · q[i] + m`.
fn q4_1_block(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let (lo, hi) = out.split_at_mut(16);
    for (j, &byte) in b[4..20].iter().enumerate() {
        lo[j] = d * (byte & 0x0F) as f32 + m;
        hi[j] = d * (byte >> 4) as f32 + m;
    }
}

/// Dequantise `bytes` holding `out.len()` elements of type `ty` into `out`.
///
/// Errors (as a message for the caller to put in context) when the type is not one tinytune
/// reads, or when `bytes` is not exactly the size `out.len()` elements take.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    if !ty.can_dequantize() {
        return Err(format!("tensor type {ty} is not supported (tinytune reads F32, F16, BF16, Q8_0, Q4_0, Q4_1)"));
    }
    let want = ty.bytes_for(out.len() as u64);
    if want != Some(bytes.len() as u64) {
        return Err(format!("{} elements of {ty} need {want:?} bytes, got {}", out.len(), bytes.len()));
    }
    let (bs, ts) = (ty.block_size(), ty.type_size());
    // Work in chunks of whole blocks so rayon has something worth splitting.
    let blocks_per_chunk = 4096 / bs;
    let (ce, cb) = (blocks_per_chunk * bs, blocks_per_chunk * ts);
    out.par_chunks_mut(ce).zip(bytes.par_chunks(cb)).for_each(|(o, b)| match ty {
        GgmlType::F32 => {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *x = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *x = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        _ => {
            let block: fn(&[u8], &mut [f32]) = match ty {
                GgmlType::Q8_0 => q8_0_block,
                GgmlType::Q4_0 => q4_0_block,
                _ => q4_1_block,
            };
            for (x, c) in o.chunks_exact_mut(bs).zip(b.chunks_exact(ts)) {
                block(c, x);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_blocks() {
        // Q8_0: d = 0.5, q = -3, 4, ... → -1.5, 2.0
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2] = (-3i8) as u8;
        b[3] = 4;
        let mut out = vec![0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut out).unwrap();
        assert_eq!(&out[..3], &[-1.5, 2.0, 0.0]);

        // Q4_0: byte 0 = 0xA3 → element 0 = 3 − 8, element 16 = 10 − 8.
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
        b[2] = 0xA3;
        dequantize(GgmlType::Q4_0, &b, &mut out).unwrap();
        assert_eq!((out[0], out[16], out[1]), (-10.0, 4.0, -16.0));

        // Q4_1: d = 0.25, m = -1; byte 15 = 0x4F → element 15 = 15·0.25 − 1, element 31 = 4·0.25 − 1.
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        b[4 + 15] = 0x4F;
        dequantize(GgmlType::Q4_1, &b, &mut out).unwrap();
        assert_eq!((out[15], out[31], out[0]), (2.75, 0.0, -1.0));
    }

    #[test]
    fn sizes_and_errors() {
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(48), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
        assert!(GgmlType::from_id(4).is_none() && GgmlType::from_id(1000).is_none());
        let q4k = GgmlType::from_id(12).unwrap();
        assert_eq!(q4k.name(), "Q4_K");
        let mut out = vec![0f32; 256];
        assert!(dequantize(q4k, &[0; 144], &mut out).unwrap_err().contains("Q4_K (12) is not supported"));
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], &mut out[..32]).is_err());
    }
}
