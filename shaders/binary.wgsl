// binary.wgsl — element-wise functions of two tensors, and the three-way select `where`.
//
// Math:
//   binary:       out[i] = a[strided_a(i)] ∘ b[strided_b(i)], ∘ by params[1]:
//                 0 +  1 −  2 ×  3 ÷  4 max  5 min  6 compare (params[2]: = ≠ < ≤ > ≥) → 1.0/0.0
//                 7 SiLU backward: y · σ(x)(1 + x(1 − σ(x))) (x = a, the SiLU input; y = b, the
//                   gradient of its output), σ(x) = 1/(1 + e^−x) evaluated stably
//   where_select: out[i] = cond[strided_c(i)] ≠ 0 ? t[strided_t(i)] : f[strided_f(i)]
//                 (cond of any dtype: f32 (0), f16 (1), bf16 (2), u32 (3), i32 (4); −0.0 is zero,
//                 NaN is not)
// Broadcasting is in the layouts: a broadcast axis has stride 0, so nothing is materialised.
//
// Bindings: 0 params, 1 out (read_write f32), 2 a | t (read f32), 3 b | f (read f32),
//           4 cond (read u32 words; where_select only).
// params: binary [n, op, cmp, record_a, record_b]; where_select [n, cond_dtype, rec_c, rec_t, rec_f]
// Launch: 1-d, 256 invocations per workgroup, one element each.

@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> cond: array<u32>;

fn cmp_f(op: u32, x: f32, y: f32) -> f32 {
    var r = false;
    switch op {
        case 0u: { r = x == y; }
        case 1u: { r = x != y; }
        case 2u: { r = x < y; }
        case 3u: { r = x <= y; }
        case 4u: { r = x > y; }
        default: { r = x >= y; }
    }
    return select(0.0, 1.0, r);
}

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i >= params[0]) { return; }
    let x = a[strided(params[3], i)];
    let y = b[strided(params[4], i)];
    var r = 0.0;
    switch params[1] {
        case 0u: { r = x + y; }
        case 1u: { r = x - y; }
        case 2u: { r = x * y; }
        case 3u: { r = x / y; }
        case 4u: { r = max(x, y); }
        case 5u: { r = min(x, y); }
        case 6u: { r = cmp_f(params[2], x, y); }
        default: {
            let e = exp(-abs(x));
            let sg = select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
            r = y * sg * (1.0 + x * (1.0 - sg));
        }
    }
    out[i] = r;
}

fn cond_true(dt: u32, i: u32) -> bool {
    if (dt == 1u || dt == 2u) {
        let h = (cond[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
        return (h & 0x7fffu) != 0u;
    }
    if (dt == 0u) {
        return (cond[i] & 0x7fffffffu) != 0u;
    }
    return cond[i] != 0u;
}

@compute @workgroup_size(256)
fn where_select(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i >= params[0]) { return; }
    if (cond_true(params[1], strided(params[2], i))) {
        out[i] = a[strided(params[3], i)];
    } else {
        out[i] = b[strided(params[4], i)];
    }
}
