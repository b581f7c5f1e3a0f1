//! Vectorisable elementary functions for the hot loops (softmax, cross-entropy).
//!
//! `std`'s `f32::exp` is a call into libm per element, which the compiler cannot vectorise.
//! `exp_f32` below is branch-free arithmetic, so a loop over a slice compiles to SIMD code.
//! Method (Cephes `expf`): write `x = n·ln2 + r` with integer `n = round(x·log₂e)` and
//! `|r| ≤ ln2/2` (ln2 split in a high and a low part so `r` is exact), approximate `e^r` by a
//! degree-7 polynomial, and scale by `2ⁿ` by building float exponent bits directly.
//! Error ≤ 2 ulp over the whole range; inputs below −87.3 give exactly 0 (so `e^{−∞} = 0`, as
//! masked softmax needs), above 88.7 give +∞, NaN stays NaN.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// `e^x` in f32, ≤ 2 ulp, vectorisable.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(-87.336_55, 88.722_83);
    // Round to nearest by adding and subtracting 1.5·2²³ (no `floor`: SSE2 has no instruction
    // for it, and a libm call would stop the loop from vectorising).
    const MAGIC: f32 = 12_582_912.0;
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let y = p * r * r + r + 1.0;
    // 2ⁿ as two factors 2^⌊n/2⌋ · 2^⌈n/2⌉: n reaches 128 near the top of the range, one past
    // the largest exponent a single normal float can hold.
    // n as an integer from t's bits (t = 1.5·2²³ + n, |n| ≤ 128, so n sits in the low bits of
    // its mantissa): one vector subtraction, where `n as i32` (a saturating conversion)
    // compiles to a scalar conversion and two conditional moves per lane.
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let (n1, n2) = (ni >> 1, ni - (ni >> 1));
    let v = y * f32::from_bits(((n1 + 127) as u32) << 23) * f32::from_bits(((n2 + 127) as u32) << 23);
    // The clamp mapped the tails into range; put the true limits (and NaN) back.
    if x < -87.336_55 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_matches_libm_within_two_ulp() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (got, want) = (exp_f32(x), (x as f64).exp() as f32);
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32;
            worst = worst.max(ulp);
            x += 0.0137;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
