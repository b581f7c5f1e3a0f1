//! Counter-based random numbers: Philox 4x32-10 (Salmon et al., "Parallel random numbers: as
//! easy as 1, 2, 3", SC 2011). A random word is a pure function of (key, counter), so every
//! element of a random tensor can be computed independently, in any order, on any device: the
//! WGSL kernel computes the same function and gets the same bits.
//!
//! The stream layout (shared with the GPU backend — keep both in sync):
//! - a stream is named by `(seed, offset)`; element `i` of it uses the counter
//!   `[lo(i/4), hi(i/4), lo(offset), hi(offset)]`, the key `[lo(seed), hi(seed)]`, and takes
//!   word `i % 4` of the Philox output;
//! - uniform in [0, 1): `(w >> 8) · 2⁻²⁴` (24 bits, exact in f32, so devices agree bit for bit);
//! - standard normal, element `i`: block `i / 2` of the stream; even `i` uses words (0, 1),
//!   odd `i` words (2, 3): Box–Muller `√(−2 ln u₁) · cos(2π u₂)` with `u₁ = ((w_a >> 8) + 1)·2⁻²⁴`
//!   in (0, 1] and `u₂ = (w_b >> 8)·2⁻²⁴`. Computed in f64 on the CPU; devices agree to rounding.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// One Philox 4x32 block: 10 rounds of multiply–xor mixing, the key bumped by the Weyl
/// constants between rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

#[inline]
fn block(seed: u64, offset: u64, b: u64) -> [u32; 4] {
    philox4x32_10([b as u32, (b >> 32) as u32, offset as u32, (offset >> 32) as u32], [seed as u32, (seed >> 32) as u32])
}

const TWO_POW_M24: f64 = 1.0 / (1u64 << 24) as f64;

/// Element `i` of the uniform [0, 1) stream `(seed, offset)`.
#[inline]
pub fn uniform_at(seed: u64, offset: u64, i: u64) -> f32 {
    let w = block(seed, offset, i / 4)[(i % 4) as usize];
    (w >> 8) as f32 * (TWO_POW_M24 as f32)
}

/// Element `i` of the standard normal stream `(seed, offset)`.
#[inline]
pub fn normal_at(seed: u64, offset: u64, i: u64) -> f64 {
    let w = block(seed, offset, i / 2);
    let (a, b) = if i % 2 == 0 { (w[0], w[1]) } else { (w[2], w[3]) };
    let u1 = ((a >> 8) as f64 + 1.0) * TWO_POW_M24;
    let u2 = (b >> 8) as f64 * TWO_POW_M24;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A seed plus a position: each draw takes a fresh stream (`offset` counts the draws), so the
/// whole random state of a training run is two integers and can be saved in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng {
    pub seed: u64,
    pub offset: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { seed, offset: 0 }
    }

    /// The `(seed, offset)` of the next stream; advances the state.
    pub fn next_stream(&mut self) -> (u64, u64) {
        let s = (self.seed, self.offset);
        self.offset += 1;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors published with Random123 (kat_vectors, philox4x32 10 rounds).
    #[test]
    fn philox_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniform_and_normal_moments() {
        let n = 200_000u64;
        let u: Vec<f64> = (0..n).map(|i| uniform_at(7, 3, i) as f64).collect();
        let mean = u.iter().sum::<f64>() / n as f64;
        let var = u.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.002, "var {var}");
        let z: Vec<f64> = (0..n).map(|i| normal_at(7, 4, i)).collect();
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
        // Different offsets give different streams.
        assert_ne!(uniform_at(7, 3, 0), uniform_at(7, 4, 0));
    }
}
