//! int8 with one scale per row: `s = max_j |x[r][j]| / 127`, `q = round(x / s)` (half away
//! from zero) in −127..=127, dequantised `q · s`. The row-wise absmax scheme of LLM.int8()'s
//! weight quantisation (without its outlier decomposition).

/// Decode granularity along a row (the scale is per row; 32 keeps a decoded run in L1).
pub const BLOCK: usize = 32;

/// Values as i8 bytes and one scale per row of `cols` values.
pub fn quantize(x: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / cols.max(1));
    for row in x.chunks(cols.max(1)) {
        let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        scales.push(s);
        q.extend(row.iter().map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
    }
    (q, scales)
}

/// Decode `bytes.len()` values of a row with scale `s`.
#[inline(always)]
pub fn decode(bytes: &[u8], s: f32, out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bytes) {
        *o = (b as i8) as f32 * s;
    }
}
