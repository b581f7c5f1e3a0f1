// rand.wgsl — counter-based random numbers: Philox 4x32-10, the stream layout of src/rng.rs.
//
// Math: block b of stream (seed, offset) is philox4x32_10(counter = [lo(b), hi(b), lo(offset),
// hi(offset)], key = [lo(seed), hi(seed)]): 10 rounds of
//   (hi0, lo0) = M0·c0, (hi1, lo1) = M1·c2 (32×32 → 64-bit products),
//   c = [hi1 ⊕ c1 ⊕ k0, lo1, hi0 ⊕ c3 ⊕ k1, lo0], the key bumped by (W0, W1) between rounds.
//   uniform element i = 4b + w:  u = (word_w >> 8)·2⁻²⁴ (exact in f32, so the bits match the
//                                CPU), value = lo + (hi − lo)·u
//   normal element i = 2b + h:   words (0,1) for h = 0, (2,3) for h = 1;
//                                u₁ = ((w_a >> 8) + 1)·2⁻²⁴, u₂ = (w_b >> 8)·2⁻²⁴,
//                                z = √(−2 ln u₁)·cos(2π u₂), value = mean + std·z (f32 here,
//                                f64 on the CPU: equal to rounding)
// WGSL has no 64-bit integers: the high half of the products is assembled from 16-bit halves.
//
// Bindings: 0 params [n, seed_lo, seed_hi, off_lo, off_hi, normal, a, b], 1 out (read_write f32).
// Launch: 1-d, 256 invocations per workgroup, one Philox block (4 or 2 elements) each.

@group(0) @binding(1) var<storage, read_write> out: array<f32>;

fn mulhi(a: u32, b: u32) -> u32 {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let ll = a0 * b0;
    let lh = a0 * b1;
    let hl = a1 * b0;
    let hh = a1 * b1;
    let mid = (ll >> 16u) + (lh & 0xffffu) + (hl & 0xffffu);
    return hh + (lh >> 16u) + (hl >> 16u) + (mid >> 16u);
}

fn philox(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key;
    for (var round = 0u; round < 10u; round++) {
        if (round > 0u) {
            k = vec2<u32>(k.x + 0x9E3779B9u, k.y + 0xBB67AE85u);
        }
        let hi0 = mulhi(0xD2511F53u, c.x);
        let lo0 = 0xD2511F53u * c.x;
        let hi1 = mulhi(0xCD9E8D57u, c.z);
        let lo1 = 0xCD9E8D57u * c.z;
        c = vec4<u32>(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

@compute @workgroup_size(256)
fn rand_fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blk = group_index(wid, nwg) * 256u + lid;
    let n = params[0];
    let normal = params[5] != 0u;
    let per = select(4u, 2u, normal);
    let first = blk * per;
    if (first >= n) { return; }
    let w = philox(vec4<u32>(blk, 0u, params[3], params[4]), vec2<u32>(params[1], params[2]));
    let a = pf32(6u);
    let b = pf32(7u);
    let scale = 1.0 / 16777216.0;
    if (normal) {
        for (var h = 0u; h < 2u; h++) {
            if (first + h < n) {
                let wa = select(w.x, w.z, h == 1u);
                let wb = select(w.y, w.w, h == 1u);
                let u1 = (f32(wa >> 8u) + 1.0) * scale;
                let u2 = f32(wb >> 8u) * scale;
                let z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
                out[first + h] = a + b * z;
            }
        }
    } else {
        for (var q = 0u; q < 4u; q++) {
            if (first + q < n) {
                let u = f32(w[q] >> 8u) * scale;
                out[first + q] = a + (b - a) * u;
            }
        }
    }
}
