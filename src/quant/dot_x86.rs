//! AVX2 dot products of a row of 32-element GGML blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) with a
//! few f32 vectors: the product of decoding one token (`QMatrix::dot_row`).
//!
//! Each block holds `x[j] = d · q[j] (+ m)`. Its codes are widened straight into four vectors of
//! eight f32 (no stack round trip), and the block adds `d · Σ_j q[j]·y[j] (+ m · Σ_j y[j])` to
//! the vector's sums. Element order within a block: codes 0..15 are the low nibbles of the 16
//! code bytes, 16..31 the high nibbles (Q8_0: the 32 bytes in order); a Q5 block's fifth bit of
//! code j is bit j of its u32 `qh`. The values equal the generic path's within f32 rounding
//! (other summation order).

use std::arch::x86_64::*;

use super::ggml::GgmlType;

/// Formats with a kernel here.
const Q8_0: u8 = 0;
const Q4_0: u8 = 1;
const Q4_1: u8 = 2;
const Q5_0: u8 = 3;
const Q5_1: u8 = 4;

/// `out[i] = row · a[i]` for the row's blocks `d` of type `t`; `false` (nothing written) for a
/// type without a kernel here.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `d` holds whole blocks of `t`, and each `a[i]` has
/// `32 · blocks` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_row(t: GgmlType, d: &[u8], a: &[&[f32]], out: &mut [f32]) -> bool {
    let format = match t {
        GgmlType::Q8_0 => Q8_0,
        GgmlType::Q4_0 => Q4_0,
        GgmlType::Q4_1 => Q4_1,
        GgmlType::Q5_0 => Q5_0,
        GgmlType::Q5_1 => Q5_1,
        _ => return false,
    };
    let ts = t.type_size();
    let nb = d.len() / ts;
    debug_assert!(d.len() == nb * ts && a.iter().all(|x| x.len() == 32 * nb));
    for (a, out) in a.chunks(4).zip(out.chunks_mut(4)) {
        match (format, a.len()) {
            (Q8_0, 1) => rows::<Q8_0, 1>(d, ts, nb, a, out),
            (Q8_0, 2) => rows::<Q8_0, 2>(d, ts, nb, a, out),
            (Q8_0, _) => rows::<Q8_0, 4>(d, ts, nb, a, out),
            (Q4_0, 1) => rows::<Q4_0, 1>(d, ts, nb, a, out),
            (Q4_0, 2) => rows::<Q4_0, 2>(d, ts, nb, a, out),
            (Q4_0, _) => rows::<Q4_0, 4>(d, ts, nb, a, out),
            (Q4_1, 1) => rows::<Q4_1, 1>(d, ts, nb, a, out),
            (Q4_1, 2) => rows::<Q4_1, 2>(d, ts, nb, a, out),
            (Q4_1, _) => rows::<Q4_1, 4>(d, ts, nb, a, out),
            (Q5_0, 1) => rows::<Q5_0, 1>(d, ts, nb, a, out),
            (Q5_0, 2) => rows::<Q5_0, 2>(d, ts, nb, a, out),
            (Q5_0, _) => rows::<Q5_0, 4>(d, ts, nb, a, out),
            (Q5_1, 1) => rows::<Q5_1, 1>(d, ts, nb, a, out),
            (Q5_1, 2) => rows::<Q5_1, 2>(d, ts, nb, a, out),
            (_, _) => rows::<Q5_1, 4>(d, ts, nb, a, out),
        }
    }
    true
}

/// Up to `M` vectors (fewer: the missing ones read as the first and are not written).
#[inline(always)]
unsafe fn rows<const F: u8, const M: usize>(d: &[u8], ts: usize, nb: usize, a: &[&[f32]], out: &mut [f32]) {
    let offset = F == Q4_1 || F == Q5_1;
    let mut y = [a[0].as_ptr(); M];
    for (y, a) in y.iter_mut().zip(a) {
        *y = a.as_ptr();
    }
    let mut sd = [_mm256_setzero_ps(); M];
    let mut sm = [_mm256_setzero_ps(); M];
    for g in 0..nb {
        let b = d.as_ptr().add(g * ts);
        let q = codes::<F>(b);
        let scale = _mm256_set1_ps(f16(b));
        let min = if offset { _mm256_set1_ps(f16(b.add(2))) } else { _mm256_setzero_ps() };
        for i in 0..M {
            let p = y[i].add(32 * g);
            let (y0, y1, y2, y3) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24)));
            let qy = _mm256_fmadd_ps(q[3], y3, _mm256_fmadd_ps(q[2], y2, _mm256_fmadd_ps(q[1], y1, _mm256_mul_ps(q[0], y0))));
            sd[i] = _mm256_fmadd_ps(scale, qy, sd[i]);
            if offset {
                sm[i] = _mm256_fmadd_ps(min, _mm256_add_ps(_mm256_add_ps(y0, y1), _mm256_add_ps(y2, y3)), sm[i]);
            }
        }
    }
    for (i, o) in out.iter_mut().enumerate().take(M) {
        *o = hsum(_mm256_add_ps(sd[i], sm[i]));
    }
}

/// The f16 at `p`, widened.
#[inline(always)]
unsafe fn f16(p: *const u8) -> f32 {
    let h = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// The 32 codes of the block at `b`, as four vectors of eight (codes 0..8, 8..16, 16..24, 24..32).
#[inline(always)]
unsafe fn codes<const F: u8>(b: *const u8) -> [__m256; 4] {
    if F == Q8_0 {
        let q = b.add(2);
        return [i8x8(q), i8x8(q.add(8)), i8x8(q.add(16)), i8x8(q.add(24))];
    }
    let at = match F {
        Q4_0 => 2,
        Q4_1 => 4,
        Q5_0 => 6,
        _ => 8,
    };
    let v = _mm_loadu_si128(b.add(at) as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    let (lo, hi) = (_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16(v, 4), mask));
    // Codes 8c .. 8c + 8 as i32: the nibbles widened.
    let mut n = [
        _mm256_cvtepu8_epi32(lo),
        _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
        _mm256_cvtepu8_epi32(hi),
        _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
    ];
    if F == Q5_0 || F == Q5_1 {
        let qh = _mm256_set1_epi32(u32::from_le_bytes([*b.add(at - 4), *b.add(at - 3), *b.add(at - 2), *b.add(at - 1)]) as i32);
        let one = _mm256_set1_epi32(1);
        for (c, n) in n.iter_mut().enumerate() {
            let shift = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * c as i32));
            let bit = _mm256_and_si256(_mm256_srlv_epi32(qh, shift), one);
            *n = _mm256_or_si256(*n, _mm256_slli_epi32(bit, 4));
        }
    }
    let bias = match F {
        Q4_0 => 8,
        Q5_0 => 16,
        _ => 0,
    };
    let bias = _mm256_set1_epi32(bias);
    [
        _mm256_cvtepi32_ps(_mm256_sub_epi32(n[0], bias)),
        _mm256_cvtepi32_ps(_mm256_sub_epi32(n[1], bias)),
        _mm256_cvtepi32_ps(_mm256_sub_epi32(n[2], bias)),
        _mm256_cvtepi32_ps(_mm256_sub_epi32(n[3], bias)),
    ]
}

/// The eight signed bytes at `p`, as f32.
#[inline(always)]
unsafe fn i8x8(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// `out[i] = row · a[i]` for one row of NF4 blocks: `codes` the row's 32-byte blocks (element
/// 2j in the high nibble of byte j, 2j + 1 in the low), `scale(g)` block g's absmax. The
/// sixteen levels are looked up in registers: the low three bits of a code index one of two
/// eight-entry tables (`vpermps`), the fourth picks the table.
///
/// # Safety
/// AVX2, FMA and F16C; each `a[i]` has 64 values per block of `codes`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_row_nf4(codes: &[u8], scale: impl Fn(usize) -> f32, a: &[&[f32]], out: &mut [f32]) {
    let nb = codes.len() / 32;
    debug_assert!(a.iter().all(|x| x.len() == 64 * nb));
    let levels = &super::nf4::LEVELS;
    let (low, high) = (_mm256_loadu_ps(levels.as_ptr()), _mm256_loadu_ps(levels.as_ptr().add(8)));
    for (a, out) in a.iter().zip(out.iter_mut()) {
        let y = a.as_ptr();
        let mut acc = _mm256_setzero_ps();
        for g in 0..nb {
            let b = codes.as_ptr().add(32 * g);
            let mut qy = _mm256_setzero_ps();
            for c in 0..4 {
                // Eight bytes: sixteen codes in element order (high nibble first).
                let v = _mm_loadl_epi64(b.add(8 * c) as *const __m128i);
                let mask = _mm_set1_epi8(0x0f);
                let inter = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
                for (h, idx) in [_mm256_cvtepu8_epi32(inter), _mm256_cvtepu8_epi32(_mm_srli_si128(inter, 8))].into_iter().enumerate() {
                    let pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
                    let w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, idx), _mm256_permutevar8x32_ps(high, idx), pick);
                    qy = _mm256_fmadd_ps(w, _mm256_loadu_ps(y.add(64 * g + 16 * c + 8 * h)), qy);
                }
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scale(g)), qy, acc);
        }
        *out = hsum(acc);
    }
}

/// `out[i] = row · a[i]` for a row of f16 (`BF16` false) or bf16 (true) values, eight at a time.
///
/// # Safety
/// AVX2, FMA and F16C; each `a[i]` has `row.len()` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_row_half<const BF16: bool>(row: &[u16], a: &[&[f32]], out: &mut [f32]) {
    let n = row.len();
    let widen = |p: *const u16| -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        } else {
            _mm256_cvtph_ps(h)
        }
    };
    for (a, out) in a.iter().zip(out.iter_mut()) {
        debug_assert_eq!(a.len(), n);
        let (w, y) = (row.as_ptr(), a.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut j = 0;
        while j + 16 <= n {
            s0 = _mm256_fmadd_ps(widen(w.add(j)), _mm256_loadu_ps(y.add(j)), s0);
            s1 = _mm256_fmadd_ps(widen(w.add(j + 8)), _mm256_loadu_ps(y.add(j + 8)), s1);
            j += 16;
        }
        let mut tail = 0f32;
        for j in j..n {
            let h = *w.add(j);
            let v = if BF16 { f32::from_bits((h as u32) << 16) } else { half::f16::from_bits(h).to_f32() };
            tail += v * *y.add(j);
        }
        *out = hsum(_mm256_add_ps(s0, s1)) + tail;
    }
}
