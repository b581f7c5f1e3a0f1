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
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
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
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) || block_decoder(self).is_some()
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

/// The f16 at byte `i`, widened exactly (the block decoders' scales). Written out rather than
/// `half::f16::to_f32`, whose per-call feature check keeps it from inlining into the block
/// loops: the magnitude's bits shifted into f32 position and rescaled by 2¹¹² (exact for normal
/// and subnormal values alike), infinities and NaNs mapped apart.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    let h = u16::from_le_bytes([b[i], b[i + 1]]) as u32;
    let mag = if h & 0x7c00 == 0x7c00 {
        f32::from_bits(0x7f80_0000 | ((h & 0x3ff) << 13))
    } else {
        f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000)
    };
    f32::from_bits(mag.to_bits() | ((h & 0x8000) << 16))
}

// The 32-element formats hold `x[i] = d · q[i] (+ m)`, with the f16 `d` at byte 0 and `m`
// (Q4_1, Q5_1) at byte 2: each has a `_codes` function that writes the codes q[i] as f32, and
// its block decoder scales them. The fused dot product (`QMatrix::dot_row`) uses the codes
// directly: Σ x[i]·y[i] = d·Σ q[i]·y[i] + m·Σ y[i].

/// Q8_0 block (34 bytes → 32 values): `x[i] = d · q[i]`.
#[inline(always)]
pub(crate) fn q8_0_codes(b: &[u8], out: &mut [f32]) {
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32;
    }
}

/// Q4_0 block (18 bytes → 32 values): `x[i] = d · (q[i] − 8)`.
#[inline(always)]
pub(crate) fn q4_0_codes(b: &[u8], out: &mut [f32]) {
    let (lo, hi) = out.split_at_mut(16);
    for (j, &byte) in b[2..18].iter().enumerate() {
        lo[j] = ((byte & 0x0F) as i32 - 8) as f32;
        hi[j] = ((byte >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1 block (20 bytes → 32 values): `x[i] = d · q[i] + m`.
#[inline(always)]
pub(crate) fn q4_1_codes(b: &[u8], out: &mut [f32]) {
    let (lo, hi) = out.split_at_mut(16);
    for (j, &byte) in b[4..20].iter().enumerate() {
        lo[j] = (byte & 0x0F) as f32;
        hi[j] = (byte >> 4) as f32;
    }
}

/// The fifth bits of a Q5 block: bit i of the little-endian u32 `qh` belongs to element i.
#[inline(always)]
fn q5_high(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Q5_0 block (22 bytes → 32 values): f16 `d`, u32 `qh`, 16 bytes of nibbles;
/// `q[i] = nibble | bit_i(qh) << 4`, `x[i] = d · (q[i] − 16)`.
#[inline(always)]
pub(crate) fn q5_0_codes(b: &[u8], out: &mut [f32]) {
    let qh = q5_high(b, 2);
    let (lo, hi) = out.split_at_mut(16);
    for (j, &byte) in b[6..22].iter().enumerate() {
        let (h0, h1) = (((qh >> j) & 1) << 4, ((qh >> (j + 16)) & 1) << 4);
        lo[j] = (((byte & 0x0F) as u32 | h0) as i32 - 16) as f32;
        hi[j] = (((byte >> 4) as u32 | h1) as i32 - 16) as f32;
    }
}

/// Q5_1 block (24 bytes → 32 values): f16 `d`, f16 `m`, u32 `qh`, 16 bytes of nibbles;
/// `x[i] = d · q[i] + m` with the 5-bit `q` of Q5_0.
#[inline(always)]
pub(crate) fn q5_1_codes(b: &[u8], out: &mut [f32]) {
    let qh = q5_high(b, 4);
    let (lo, hi) = out.split_at_mut(16);
    for (j, &byte) in b[8..24].iter().enumerate() {
        let (h0, h1) = (((qh >> j) & 1) << 4, ((qh >> (j + 16)) & 1) << 4);
        lo[j] = ((byte & 0x0F) as u32 | h0) as f32;
        hi[j] = ((byte >> 4) as u32 | h1) as f32;
    }
}

/// A 32-element block decoded from its codes: `d · q` (the products gguf-py forms), plus `m`
/// where the format has one.
#[inline(always)]
fn scaled(b: &[u8], out: &mut [f32], offset: bool) {
    let (d, m) = (f16_at(b, 0), if offset { f16_at(b, 2) } else { 0.0 });
    for o in out.iter_mut() {
        *o = if offset { d * *o + m } else { d * *o };
    }
}

/// AVX2 block decoders.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// A Q4_0 (`offset` false: `d · (q − 8)`) or Q4_1 (`d · q + m`) block of 32 values, the same
    /// f32 products and sums as [`super::q4_0_block`] / [`super::q4_1_block`] (a multiply then
    /// an add, no fused multiply-add, so bit for bit equal).
    ///
    /// # Safety
    /// The CPU must have AVX2; `b` holds one block (18 or 20 bytes), `out` 32 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn q4_block_avx2(b: &[u8], out: &mut [f32], offset: bool) {
        debug_assert!(out.len() == 32 && b.len() >= if offset { 20 } else { 18 });
        let d = _mm256_set1_ps(super::f16_at(b, 0));
        let (m, at, bias) = if offset { (super::f16_at(b, 2), 4, 0) } else { (0.0, 2, 8) };
        let m = _mm256_set1_ps(m);
        let bias = _mm256_set1_epi32(bias);
        // SAFETY: 16 bytes at `at` lie inside the block (checked above); `out` holds 32 floats.
        unsafe {
            let q = _mm_loadu_si128(b.as_ptr().add(at) as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let halves = [_mm_and_si128(q, mask), _mm_and_si128(_mm_srli_epi16(q, 4), mask)];
            for (h, v) in halves.into_iter().enumerate() {
                for e in 0..2 {
                    let bytes = if e == 0 { v } else { _mm_srli_si128(v, 8) };
                    let codes = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), bias);
                    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(codes), d);
                    let f = if offset { _mm256_add_ps(f, m) } else { f };
                    _mm256_storeu_ps(out.as_mut_ptr().add(h * 16 + e * 8), f);
                }
            }
        }
    }
}

#[inline(always)]
pub(crate) fn q8_0_block(b: &[u8], out: &mut [f32]) {
    q8_0_codes(b, out);
    scaled(b, out, false)
}

#[inline(always)]
pub(crate) fn q4_0_block(b: &[u8], out: &mut [f32]) {
    q4_0_codes(b, out);
    scaled(b, out, false)
}

#[inline(always)]
pub(crate) fn q4_1_block(b: &[u8], out: &mut [f32]) {
    q4_1_codes(b, out);
    scaled(b, out, true)
}

#[inline(always)]
pub(crate) fn q5_0_block(b: &[u8], out: &mut [f32]) {
    q5_0_codes(b, out);
    scaled(b, out, false)
}

#[inline(always)]
pub(crate) fn q5_1_block(b: &[u8], out: &mut [f32]) {
    q5_1_codes(b, out);
    scaled(b, out, true)
}

/// Q2_K super-block (84 bytes → 256 values): `scales[16]` (low nibble: the scale, high nibble:
/// the min of one 16-element group), `qs[64]` (2-bit values), f16 `d`, f16 `dmin`.
/// Group g's element: `d · (scales[g] & 15) · q − dmin · (scales[g] >> 4)`. The 2-bit values
/// are laid out in two halves of 128: byte l (0..32) of a half's 32 bytes holds, at bit
/// shift 2j, element 32j + l of that half.
#[inline(always)]
pub(crate) fn q2_k_block(b: &[u8], out: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for j in 0..4 {
            for sub in 0..2 {
                let sc = scales[half * 8 + j * 2 + sub];
                let (dl, ml) = (d * (sc & 0x0F) as f32, dmin * (sc >> 4) as f32);
                let o = &mut out[half * 128 + j * 32 + sub * 16..][..16];
                for (l, o) in o.iter_mut().enumerate() {
                    *o = dl * ((q[sub * 16 + l] >> (2 * j)) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// The sixteen 6-bit scales of a Q3_K super-block, unpacked from its 12 bytes: the low
/// nibbles of bytes 0..8 hold scales 0..8 and the high nibbles scales 8..16; bytes 8..12
/// hold the two top bits of all sixteen, scale s at bit 2·(s / 4) of byte 8 + s % 4.
#[inline(always)]
fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    std::array::from_fn(|i| {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// Q3_K super-block (110 bytes → 256 values): `hmask[32]` (the third bit), `qs[64]` (the low
/// two bits, laid out as in Q2_K), `scales[12]` (sixteen 6-bit signed scales, offset 32), f16
/// `d`. Element: `d · scale_g · (q − 4·(1 − hbit))`, `q ∈ 0..4`; the high bit of element
/// 32j + l of half h is bit 4h + j of `hmask[l]`.
#[inline(always)]
pub(crate) fn q3_k_block(b: &[u8], out: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_at(b, 108);
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for j in 0..4 {
            let bit = 1u8 << (half * 4 + j);
            for sub in 0..2 {
                let dl = d * scales[half * 8 + j * 2 + sub] as f32;
                let o = &mut out[half * 128 + j * 32 + sub * 16..][..16];
                for (l, o) in o.iter_mut().enumerate() {
                    let i = sub * 16 + l;
                    let low = ((q[i] >> (2 * j)) & 3) as i32;
                    let sub4 = if hmask[i] & bit != 0 { 0 } else { 4 };
                    *o = dl * (low - sub4) as f32;
                }
            }
        }
    }
}

/// Scale and min of sub-block j (0..8) of a Q4_K/Q5_K super-block, six bits each, from its 12
/// scale bytes: j < 4 in the low six bits of bytes j and j + 4; j ≥ 4 in the nibbles of byte
/// j + 4 with their top two bits in the top bits of bytes j − 4 and j.
#[inline(always)]
fn k4_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Q4_K super-block (144 bytes → 256 values): f16 `d`, f16 `dmin`, `scales[12]` (eight 6-bit
/// scale/min pairs), `qs[128]`. Sub-block j of 32: `d · sc_j · q − dmin · m_j`; the 32 bytes
/// `qs[32c..]` hold sub-block 2c in their low nibbles and 2c + 1 in their high ones.
#[inline(always)]
pub(crate) fn q4_k_block(b: &[u8], out: &mut [f32]) {
    let (d, dmin, scales, qs) = (f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..144]);
    for c in 0..4 {
        let q = &qs[c * 32..c * 32 + 32];
        for nib in 0..2 {
            let (sc, m) = k4_scale_min(scales, 2 * c + nib);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            for (l, o) in out[c * 64 + nib * 32..][..32].iter_mut().enumerate() {
                *o = dl * ((q[l] >> (4 * nib)) & 0x0F) as f32 - ml;
            }
        }
    }
}

/// Q5_K super-block (176 bytes → 256 values): Q4_K with a fifth bit: f16 `d`, f16 `dmin`,
/// `scales[12]`, `qh[32]`, `qs[128]`; the fifth bit of element l of sub-block j is bit j of
/// `qh[l]`.
#[inline(always)]
pub(crate) fn q5_k_block(b: &[u8], out: &mut [f32]) {
    let (d, dmin, scales, qh, qs) = (f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..48], &b[48..176]);
    for c in 0..4 {
        let q = &qs[c * 32..c * 32 + 32];
        for nib in 0..2 {
            let j = 2 * c + nib;
            let (sc, m) = k4_scale_min(scales, j);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            for (l, o) in out[c * 64 + nib * 32..][..32].iter_mut().enumerate() {
                let high = if qh[l] & (1 << j) != 0 { 16 } else { 0 };
                *o = dl * (((q[l] >> (4 * nib)) & 0x0F) + high) as f32 - ml;
            }
        }
    }
}

/// Q6_K super-block (210 bytes → 256 values): `ql[128]` (low four bits), `qh[64]` (high two
/// bits), `scales[16]` (i8, one per 16 elements), f16 `d`. Element: `d · scale · (q − 32)`,
/// `q ∈ 0..64`. Each half of 128 elements uses 64 bytes of `ql` and 32 of `qh`: element
/// 32k + l (k < 4) takes the low or high nibble of `ql[l + 32·(k & 1)]` (high for k ≥ 2) and
/// bits 2k..2k+2 of `qh[l]`.
#[inline(always)]
pub(crate) fn q6_k_block(b: &[u8], out: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[half * 64..], &qh[half * 32..], &sc[half * 8..]);
        for k in 0..4 {
            for l in 0..32 {
                let low = (ql[l + 32 * (k & 1)] >> (4 * (k / 2))) & 0x0F;
                let q = (low | (((qh[l] >> (2 * k)) & 3) << 4)) as i32 - 32;
                out[half * 128 + 32 * k + l] = d * (sc[l / 16 + 2 * k] as i8) as f32 * q as f32;
            }
        }
    }
}

/// The decoder of one block of a block format (`None` for element types such as F16): reads
/// `type_size()` bytes, writes `block_size()` values.
pub fn block_decoder(ty: GgmlType) -> Option<fn(&[u8], &mut [f32])> {
    Some(match ty {
        GgmlType::Q8_0 => q8_0_block,
        GgmlType::Q4_0 => q4_0_block,
        GgmlType::Q4_1 => q4_1_block,
        GgmlType::Q5_0 => q5_0_block,
        GgmlType::Q5_1 => q5_1_block,
        GgmlType::Q2_K => q2_k_block,
        GgmlType::Q3_K => q3_k_block,
        GgmlType::Q4_K => q4_k_block,
        GgmlType::Q5_K => q5_k_block,
        GgmlType::Q6_K => q6_k_block,
        _ => return None,
    })
}

/// The types tinytune reads, as listed in errors.
pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// Decode `bytes` holding `out.len()` elements of the element type or block format `ty`
/// (sizes already checked), sequentially.
pub fn decode_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (x, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (x, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *x = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (x, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *x = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        _ => {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            // One loop per format with its decoder called directly, so it inlines (a call
            // through a function pointer per 32-value block costs as much as the decoding).
            #[inline(always)]
            fn blocks(out: &mut [f32], bytes: &[u8], bs: usize, ts: usize, f: impl Fn(&[u8], &mut [f32])) {
                for (x, c) in out.chunks_exact_mut(bs).zip(bytes.chunks_exact(ts)) {
                    f(c, x);
                }
            }
            match ty {
                GgmlType::Q8_0 => blocks(out, bytes, bs, ts, q8_0_block),
                GgmlType::Q4_0 => blocks(out, bytes, bs, ts, q4_0_block),
                GgmlType::Q4_1 => blocks(out, bytes, bs, ts, q4_1_block),
                GgmlType::Q5_0 => blocks(out, bytes, bs, ts, q5_0_block),
                GgmlType::Q5_1 => blocks(out, bytes, bs, ts, q5_1_block),
                GgmlType::Q2_K => blocks(out, bytes, bs, ts, q2_k_block),
                GgmlType::Q3_K => blocks(out, bytes, bs, ts, q3_k_block),
                GgmlType::Q4_K => blocks(out, bytes, bs, ts, q4_k_block),
                GgmlType::Q5_K => blocks(out, bytes, bs, ts, q5_k_block),
                GgmlType::Q6_K => blocks(out, bytes, bs, ts, q6_k_block),
                _ => unreachable!("decode_into: callers check can_dequantize"),
            }
        }
    }
}

/// Dequantise `bytes` holding `out.len()` elements of type `ty` into `out`.
///
/// Errors (as a message for the caller to put in context) when the type is not one tinytune
/// reads, or when `bytes` is not exactly the size `out.len()` elements take.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    if !ty.can_dequantize() {
        return Err(format!("tensor type {ty} is not supported (tinytune reads {SUPPORTED})"));
    }
    let want = ty.bytes_for(out.len() as u64);
    if want != Some(bytes.len() as u64) {
        return Err(format!("{} elements of {ty} need {want:?} bytes, got {}", out.len(), bytes.len()));
    }
    let (bs, ts) = (ty.block_size(), ty.type_size());
    // Work in chunks of whole blocks so rayon has something worth splitting.
    let blocks_per_chunk = 4096 / bs;
    let (ce, cb) = (blocks_per_chunk * bs, blocks_per_chunk * ts);
    out.par_chunks_mut(ce).zip(bytes.par_chunks(cb)).for_each(|(o, b)| decode_into(ty, b, o));
    Ok(())
}

/// The formats [`quantize`] writes.
pub const WRITES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K";

/// Quantise `x` (a whole number of blocks) to a GGML block format tinytune writes. Q8_0, Q4_0
/// and Q5_0 round as ggml's reference quantisers and gguf-py do:
/// * Q8_0: `d = max|x|/127`, `q = round(x/d)` (half away from zero);
/// * Q4_0: `d = m/−8` with `m` the value of largest magnitude (sign kept), `q = min(15,
///   trunc(x/d + 8.5))`;
/// * Q5_0: `d = m/−16`, `q = min(31, trunc(x/d + 16.5))`, the fifth bits in `qh`;
/// * Q4_K: see [`q4_k_quantize`] (a least-squares fit of each sub-block's scale and min; its
///   blocks decode as every Q4_K block does, but it is not ggml's search, so its bytes differ).
///
/// `d` is stored as f16 (the division uses the f32 `d`, as ggml does).
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>, String> {
    let bs = ty.block_size();
    if x.len() % bs != 0 {
        return Err(format!("{} values are not a whole number of {ty} blocks of {bs}", x.len()));
    }
    let mut out = Vec::with_capacity(x.len() / bs * ty.type_size());
    match ty {
        GgmlType::Q8_0 => {
            for b in x.chunks_exact(32) {
                let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in x.chunks_exact(32) {
                let m = b.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = m / -8.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        GgmlType::Q5_0 => {
            for b in x.chunks_exact(32) {
                let m = b.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = m / -16.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                let q = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
                let qh = (0..16).fold(0u32, |h, j| h | (((q(b[j]) >> 4) as u32) << j) | (((q(b[j + 16]) >> 4) as u32) << (j + 16)));
                out.extend_from_slice(&qh.to_le_bytes());
                out.extend((0..16).map(|j| (q(b[j]) & 0x0F) | ((q(b[j + 16]) & 0x0F) << 4)));
            }
        }
        GgmlType::Q4_K => {
            let blocks: Vec<[u8; 144]> = x.par_chunks_exact(256).map(q4_k_quantize).collect();
            out.extend(blocks.iter().flatten());
        }
        GgmlType::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(x.iter().flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())),
        GgmlType::BF16 => out.extend(x.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())),
        _ => return Err(format!("tinytune does not write {ty} (it writes {WRITES})")),
    }
    Ok(out)
}

/// The scale `s ≥ 0` and min `m ≥ 0` of one Q4_K sub-block (`x ≈ s·q − m`, `q ∈ 0..=15`) that
/// fit `x` best in least squares: for each of a few starting scales, alternate rounding `q`
/// and the closed-form fit of `(s, m)` to those `q`, and keep the pair with the smallest error.
fn q4_k_fit(x: &[f32]) -> (f32, f32) {
    let (lo, hi) = x.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    if hi <= lo {
        return (0.0, -lo);
    }
    let err = |s: f32, m: f32| -> f32 {
        x.iter()
            .map(|&v| {
                let q = if s > 0.0 { ((v + m) / s).round().clamp(0.0, 15.0) } else { 0.0 };
                (s * q - m - v).powi(2)
            })
            .sum()
    };
    let mut best = ((hi - lo) / 15.0, -lo);
    let mut best_err = err(best.0, best.1);
    for step in 0..=12 {
        // Starting scales a little below and above the range / 15, as the rounding prefers.
        let mut s = (hi - lo) / (15.0 + 0.1 * (step as f32 - 6.0));
        let mut m = -lo;
        for _ in 0..3 {
            let q: Vec<f32> = x.iter().map(|&v| ((v + m) / s).round().clamp(0.0, 15.0)).collect();
            // Least squares of v = s·q + c over the sub-block, then m = −c (kept ≥ 0).
            let n = x.len() as f32;
            let (sq, sqq) = (q.iter().sum::<f32>(), q.iter().map(|q| q * q).sum::<f32>());
            let (sv, sqv) = (x.iter().sum::<f32>(), q.iter().zip(x).map(|(q, v)| q * v).sum::<f32>());
            let det = n * sqq - sq * sq;
            if det <= 0.0 {
                break;
            }
            let s_new = (n * sqv - sq * sv) / det;
            let c = (sv - s_new * sq) / n;
            if s_new <= 0.0 {
                break;
            }
            let (s2, m2) = if c > 0.0 { (sqv / sqq, 0.0) } else { (s_new, -c) };
            s = s2;
            m = m2;
        }
        let e = err(s, m);
        if e < best_err {
            best = (s, m);
            best_err = e;
        }
    }
    best
}

/// One Q4_K super-block (256 values → 144 bytes): each sub-block of 32 gets its own scale and
/// min ([`q4_k_fit`]); those are quantised to six bits against the super-block's f16 `d` and
/// `dmin` (`d = max s / 63`, `dmin = max m / 63`), and the values are rounded again against the
/// scales as stored. The packing is the inverse of the decoder's (`k4_scale_min`).
fn q4_k_quantize(x: &[f32]) -> [u8; 144] {
    let fits: Vec<(f32, f32)> = x.chunks_exact(32).map(q4_k_fit).collect();
    let max_s = fits.iter().fold(0f32, |a, f| a.max(f.0));
    let max_m = fits.iter().fold(0f32, |a, f| a.max(f.1));
    let (d, dmin) = (f16::from_f32(max_s / 63.0), f16::from_f32(max_m / 63.0));
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    let six = |v: f32, unit: f32| if unit > 0.0 { (v / unit).round().clamp(0.0, 63.0) as u8 } else { 0 };
    let sc: Vec<(u8, u8)> = fits.iter().map(|&(s, m)| (six(s, df), six(m, dminf))).collect();
    let mut b = [0u8; 144];
    b[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
    b[2..4].copy_from_slice(&dmin.to_bits().to_le_bytes());
    let scales = &mut b[4..16];
    for (j, &(s, m)) in sc.iter().enumerate() {
        if j < 4 {
            scales[j] |= s & 63;
            scales[j + 4] |= m & 63;
        } else {
            scales[j + 4] |= (s & 0x0F) | ((m & 0x0F) << 4);
            scales[j - 4] |= (s >> 4) << 6;
            scales[j] |= (m >> 4) << 6;
        }
    }
    for (j, (sub, &(s, m))) in x.chunks_exact(32).zip(&sc).enumerate() {
        let (dl, ml) = (df * s as f32, dminf * m as f32);
        let (c, shift) = (j / 2, 4 * (j % 2));
        for (l, &v) in sub.iter().enumerate() {
            let q = if dl > 0.0 { ((v + ml) / dl).round().clamp(0.0, 15.0) as u8 } else { 0 };
            b[16 + c * 32 + l] |= q << shift;
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_scales_widen_exactly_for_all_65536_values() {
        for h in 0..=u16::MAX {
            let (got, want) = (f16_at(&h.to_le_bytes(), 0), f16::from_bits(h).to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#06x}: {got} vs {want}");
        }
    }

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

    /// Every written format decodes back near its input, the finer formats nearer: Q4_K's
    /// fitted scales and mins beat Q4_0's one scale per 32 on Gaussian rows, Q5_0 beats both,
    /// Q8_0 beats Q5_0, and F16/BF16 round each value once.
    #[test]
    fn written_formats_round_trip() {
        // Gaussian values with a per-256 scale that varies, and an all-zero super-block.
        let mut x: Vec<f32> = (0..256 * 12).map(|i| crate::rng::normal_at(3, 0, i) as f32 * (1.0 + (i / 256) as f32 * 0.3)).collect();
        x[256..512].iter_mut().for_each(|v| *v = 0.0);
        x[600] = 9.0; // an outlier
        let rms = |ty: GgmlType| {
            let bytes = quantize(ty, &x).unwrap();
            assert_eq!(bytes.len() as u64, ty.bytes_for(x.len() as u64).unwrap(), "{ty}");
            let mut y = vec![0f32; x.len()];
            dequantize(ty, &bytes, &mut y).unwrap();
            assert!(y[256..512].iter().all(|&v| v == 0.0), "{ty}: zeros stay zero");
            let e: f32 = x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum();
            (e / x.len() as f32).sqrt()
        };
        let scale = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
        let (q40, q4k, q50, q80) = (rms(GgmlType::Q4_0), rms(GgmlType::Q4_K), rms(GgmlType::Q5_0), rms(GgmlType::Q8_0));
        eprintln!("rms error / rms: Q4_0 {} Q4_K {} Q5_0 {} Q8_0 {}", q40 / scale, q4k / scale, q50 / scale, q80 / scale);
        assert!(q40 < 0.12 * scale, "Q4_0 rms error {q40}");
        assert!(q4k < 0.9 * q40, "Q4_K {q4k} vs Q4_0 {q40}");
        assert!(q50 < 0.6 * q40 && q50 < q4k, "Q5_0 {q50} vs Q4_0 {q40}, Q4_K {q4k}");
        assert!(q80 < 0.1 * q40, "Q8_0 {q80}");
        assert!(rms(GgmlType::F16) < 1e-3 * scale && rms(GgmlType::BF16) < 1e-2 * scale && rms(GgmlType::F32) == 0.0);
        assert!(quantize(GgmlType::Q6_K, &x).unwrap_err().contains("does not write Q6_K"));
        assert!(quantize(GgmlType::Q4_K, &x[..128]).unwrap_err().contains("whole number"));
    }

    #[test]
    fn sizes_and_errors() {
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(48), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
        assert!(GgmlType::from_id(4).is_none() && GgmlType::from_id(1000).is_none());
        let iq4 = GgmlType::from_id(23).unwrap();
        assert_eq!(iq4.name(), "IQ4_XS");
        let mut out = vec![0f32; 256];
        assert!(dequantize(iq4, &[0; 136], &mut out).unwrap_err().contains("IQ4_XS (23) is not supported"));
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], &mut out[..32]).is_err());
    }
}
