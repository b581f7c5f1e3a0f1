//! NF4 (4-bit NormalFloat, QLoRA, Dettmers et al. 2023) with double-quantised scales.
//!
//! # The format
//! * Blocks of [`BLOCK`] = 64 consecutive values (along a row) share one scale, the block's
//!   absolute maximum `c = max |x|`.
//! * Each value is stored as the 4-bit index of the nearest of the sixteen [`LEVELS`] (quantiles
//!   of a standard normal, rescaled to [−1, 1], with an exact zero) to `x / c`; two per byte,
//!   the even element in the high nibble. Dequantised: `LEVELS[q] · c`.
//! * Double quantisation of the scales: their mean `offset` is subtracted, and the differences
//!   are stored as 8-bit indices into bitsandbytes' signed "dynamic" code ([`dynamic_code`]),
//!   in blocks of 256 scales with one f32 absmax each: `c = code[q₈] · a₂₅₆ + offset`. That
//!   costs 8/64 + 32/(64·256) ≈ 0.127 bits per weight instead of 0.5.
//!
//! Quantising follows bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64,
//! compress_statistics=True)`: `x · (1/c)` clamped to [−1, 1], then the index is the number
//! of midpoints between consecutive levels that lie strictly below it (so a value exactly on a
//! midpoint takes the lower level). `tests/quant.rs` checks codes and scales against
//! bitsandbytes' own output.

/// Values per block.
pub const BLOCK: usize = 64;

/// Scales per block of the double quantisation.
pub const SCALE_BLOCK: usize = 256;

/// The sixteen NF4 levels (QLoRA, appendix E; the values bitsandbytes uses).
pub const LEVELS: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True)`, Dettmers 2016):
/// for exponents `e = 0..7`, the `2^e` midpoints of `linspace(0.1, 1, 2^e + 1)` (in f32) times
/// `10^(e−6)` (in f32), with both signs; then 0 and 1; sorted. 256 values in [−1, 1].
pub fn dynamic_code() -> &'static [f32; 256] {
    static CODE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    CODE.get_or_init(|| {
        let mut code: Vec<f32> = Vec::with_capacity(256);
        for e in 0..7i32 {
            let n = (1usize << e) + 1;
            let b = linspace_f32(0.1, 1.0, n);
            for w in b.windows(2) {
                // All in f32, as torch multiplies an f32 tensor by a Python scalar.
                let mean = (w[0] + w[1]) / 2.0;
                let mag = 10f64.powi(e - 6) as f32 * mean;
                code.push(mag);
                code.push(-mag);
            }
        }
        code.push(0.0);
        code.push(1.0);
        code.sort_by(|a, b| a.total_cmp(b));
        code.try_into().expect("7 exponents give 254 values, plus 0 and 1")
    })
}

/// `torch.linspace(start, end, n)` in f32, as its CPU kernel computes it: the first half
/// counts up from `start`, the second half down from `end`, each point one fused
/// multiply-add with `step = (end − start)/(n − 1)` (the fused rounding matters: it is what
/// makes the code bit-identical to bitsandbytes').
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) }).collect()
}

/// The index of the value among `levels` that `x` rounds to: the number of midpoints
/// `(levels[i] + levels[i+1])/2` strictly below `x` (`torch.bucketize`, right=False).
fn bucket(x: f32, mids: &[f32]) -> usize {
    mids.partition_point(|&m| m < x)
}

fn midpoints(levels: &[f32]) -> Vec<f32> {
    levels.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// The per-block scales of an NF4 matrix, double-quantised.
#[derive(Debug, Clone, PartialEq)]
pub struct Absmax {
    /// One 8-bit index into [`dynamic_code`] per block of 64 values.
    pub q: Vec<u8>,
    /// One f32 absmax per 256 scales.
    pub scale: Vec<f32>,
    /// The mean that was subtracted from the scales.
    pub offset: f32,
}

impl Absmax {
    /// The scale of block `g`: `code[q[g]] · scale[g/256] + offset`.
    #[inline]
    pub fn get(&self, g: usize) -> f32 {
        dynamic_code()[self.q[g] as usize] * self.scale[g / SCALE_BLOCK] + self.offset
    }

    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len() + 4
    }
}

/// Block-wise absmax quantisation of `x` (length a multiple of `block` not required: the last
/// block may be short) onto `levels`: the indices and the absmax of each block.
fn quantize_blockwise(x: &[f32], block: usize, levels: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mids = midpoints(levels);
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for b in x.chunks(block) {
        let c = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 1.0 / c.max(1e-38);
        absmax.push(c);
        q.extend(b.iter().map(|&v| bucket((v * inv).clamp(-1.0, 1.0), &mids) as u8));
    }
    (q, absmax)
}

/// The NF4 codes (packed two per byte) and the double-quantised scales of `x`, whose length is
/// a multiple of [`BLOCK`].
pub fn quantize(x: &[f32]) -> (Vec<u8>, Absmax) {
    let (q, absmax) = quantize_nf4_single(x);
    let packed = q.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, double_quantize(&absmax))
}

/// NF4 indices (one per value, unpacked) and the f32 absmax of each block, before double
/// quantisation.
pub fn quantize_nf4_single(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    debug_assert!(x.len() % BLOCK == 0);
    quantize_blockwise(x, BLOCK, &LEVELS)
}

/// Double quantisation of block scales: subtract their mean, then 8-bit dynamic-code
/// quantisation in blocks of 256.
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let (q, scale) = quantize_blockwise(&centred, SCALE_BLOCK, dynamic_code());
    Absmax { q, scale, offset }
}

/// Decode one block: `bytes` holds 32 bytes (64 nibbles), `c` its scale.
#[inline(always)]
pub fn decode_block(bytes: &[u8], c: f32, out: &mut [f32]) {
    for (o, &b) in out.chunks_exact_mut(2).zip(bytes) {
        o[0] = LEVELS[(b >> 4) as usize] * c;
        o[1] = LEVELS[(b & 0x0F) as usize] * c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_code_is_sorted_signed_and_ends_at_one() {
        let c = dynamic_code();
        assert!(c.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!((c[0], c[255]), (-0.99296875, 1.0));
        assert!(c.contains(&0.0));
    }

    #[test]
    fn levels_round_to_themselves_and_midpoints_to_the_lower_level() {
        let mids = midpoints(&LEVELS);
        for (i, &l) in LEVELS.iter().enumerate() {
            assert_eq!(bucket(l, &mids), i);
        }
        assert_eq!(bucket(mids[3], &mids), 3);
        assert_eq!(bucket(-5.0, &mids), 0);
        assert_eq!(bucket(5.0, &mids), 15);
    }

    #[test]
    fn error_is_within_half_a_level_gap_of_the_block_scale() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let (codes, absmax) = quantize(&x);
        let mut out = vec![0f32; 256];
        for g in 0..4 {
            decode_block(&codes[g * 32..g * 32 + 32], absmax.get(g), &mut out[g * 64..g * 64 + 64]);
        }
        let c = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in x.iter().zip(&out) {
            // The widest gap between levels is 0.3038 (at ±1); the double-quantised scale adds
            // under 1% of c.
            assert!((a - b).abs() <= 0.16 * c, "{a} vs {b}");
        }
    }
}
