// common.wgsl — prepended to every kernel family (the launcher concatenates the sources).
//
// Binding 0 of every kernel is `params`, a small read-only array of u32 holding the launch's
// scalars (f32 values as their bit patterns) and layout records, so one pipeline serves every
// shape. A layout record at params[p] is
//     [rank, offset, shape[0], .., shape[rank-1], stride[0], .., stride[rank-1]]
// (element strides, 0 for a broadcast axis), exactly `crate::layout::Layout`.
//
// 1-d launches spread their workgroups over x and y (x ≤ 65535): the linear workgroup index is
// `wid.y · nwg.x + wid.x`.

@group(0) @binding(0) var<storage, read> params: array<u32>;

// Storage index of the logical (row-major) element `i` of the layout record at params[p].
fn strided(p: u32, i: u32) -> u32 {
    let rank = params[p];
    var off = params[p + 1u];
    var rem = i;
    var k = rank;
    loop {
        if (k == 0u) { break; }
        k = k - 1u;
        let d = params[p + 2u + k];
        let s = params[p + 2u + rank + k];
        off = off + (rem % d) * s;
        rem = rem / d;
    }
    return off;
}

fn pf32(k: u32) -> f32 {
    return bitcast<f32>(params[k]);
}

fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// +∞ and NaN made at run time (a constant expression may not evaluate to either).
fn f32_inf() -> f32 {
    var bits = 0x7f800000u;
    return bitcast<f32>(bits);
}

fn f32_nan() -> f32 {
    var bits = 0x7fc00000u;
    return bitcast<f32>(bits);
}

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// Workgroup trees for kernels with one 64-wide workgroup per row. Call from uniform control
// flow; every invocation gets the result.
var<workgroup> wg_red: array<f32, 64>;

fn tree_sum(lid: u32, v: f32) -> f32 {
    wg_red[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            wg_red[lid] = wg_red[lid] + wg_red[lid + s];
        }
        workgroupBarrier();
    }
    let r = wg_red[0];
    workgroupBarrier();
    return r;
}

fn tree_max(lid: u32, v: f32) -> f32 {
    wg_red[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            wg_red[lid] = max(wg_red[lid], wg_red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = wg_red[0];
    workgroupBarrier();
    return r;
}
