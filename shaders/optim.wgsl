// optim.wgsl — one fused AdamW step (decoupled weight decay), one pass over memory.
//
// Math, per element, with g the gradient and t the step:
//   m' = β1·m + (1 − β1)·g
//   v' = β2·v + (1 − β2)·g²
//   p' = p·(1 − lr·wd) − s · m' / (√v' / c + eps),   s = lr/(1 − β1ᵗ),  c = √(1 − β2ᵗ)
// (s and c, the bias corrections, are computed on the host in f64.)
// p and g are read through their layouts; m, v and the outputs are contiguous.
//
// Bindings: 0 params [n, β1, β2, eps, 1 − lr·wd, s, c, rec_p, rec_g],
//           1 p' 2 m' 3 v' (read_write), 4 p 5 g 6 m 7 v (read).
// Launch: 1-d, 256 invocations per workgroup, one element each.

@group(0) @binding(1) var<storage, read_write> p_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> m_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> v_out: array<f32>;
@group(0) @binding(4) var<storage, read> p: array<f32>;
@group(0) @binding(5) var<storage, read> g: array<f32>;
@group(0) @binding(6) var<storage, read> m: array<f32>;
@group(0) @binding(7) var<storage, read> v: array<f32>;

@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i >= params[0]) { return; }
    let b1 = pf32(1u);
    let b2 = pf32(2u);
    let gi = g[strided(params[8], i)];
    let mi = b1 * m[i] + (1.0 - b1) * gi;
    let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
    p_out[i] = p[strided(params[7], i)] * pf32(4u) - pf32(5u) * mi / (sqrt(vi) / pf32(6u) + pf32(3u));
    m_out[i] = mi;
    v_out[i] = vi;
}
