// reduce.wgsl — sum / max / min / argmax / argmin along one axis.
//
// Math: for each output o (the input's elements with the axis removed, row-major),
//   sum:    out[o] = Σ_j x[base(o) + j·stride]
//   max:    out[o] = max_j x[..]  (NaN propagates, as on the CPU); min likewise
//   argmax: out[o] = the first j with x[..] = max (u32); argmin likewise
// where base(o) = strided(record of the input without the axis, o), j < d.
//
// Tiling: one workgroup of 64 invocations per output; invocation t folds j = t, t+64, ..
// (ascending, so a strict comparison keeps the first index), then a shared-memory tree halves
// the 64 partials in 6 steps (ties in arg-reductions go to the smaller index).
//
// Bindings: 0 params [n_out, d, stride, op (0 sum 1 max 2 min 3 argmax 4 argmin), record],
//           1 out (read_write u32 words: f32 bits, or the index), 2 x (read f32).
// Launch: one workgroup per output, spread over x and y.

@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

var<workgroup> sv: array<f32, 64>;
var<workgroup> si: array<u32, 64>;

const NONE: u32 = 0xffffffffu;

// Whether the candidate (v, i) beats the current (a, ia) for op 1..4.
fn better(op: u32, v: f32, i: u32, a: f32, ia: u32) -> bool {
    switch op {
        case 1u: { return v > a || is_nan(v); }
        case 2u: { return v < a || is_nan(v); }
        case 3u: { return i != NONE && (ia == NONE || v > a || (v == a && i < ia)); }
        default: { return i != NONE && (ia == NONE || v < a || (v == a && i < ia)); }
    }
}

@compute @workgroup_size(64)
fn reduce_axis(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= params[0]) { return; }
    let d = params[1];
    let stride = params[2];
    let op = params[3];
    let base = strided(params[4], row);
    var acc = 0.0;
    if (op == 1u || op == 3u) { acc = -f32_inf(); }
    if (op == 2u || op == 4u) { acc = f32_inf(); }
    var idx = NONE;
    for (var j = lid; j < d; j = j + 64u) {
        let v = x[base + j * stride];
        if (op == 0u) {
            acc = acc + v;
        } else if (better(op, v, j, acc, idx)) {
            acc = v;
            idx = j;
        }
    }
    sv[lid] = acc;
    si[lid] = idx;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            if (op == 0u) {
                sv[lid] = sv[lid] + sv[lid + s];
            } else if (better(op, sv[lid + s], si[lid + s], sv[lid], si[lid])) {
                sv[lid] = sv[lid + s];
                si[lid] = si[lid + s];
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        if (op >= 3u) {
            out[row] = select(si[0], 0u, si[0] == NONE);
        } else {
            out[row] = bitcast<u32>(sv[0]);
        }
    }
}
