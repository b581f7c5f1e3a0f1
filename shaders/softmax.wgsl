// softmax.wgsl — softmax or log-softmax along the last axis, one pass per row in registers.
//
// Math: with μ = max_j x_j and s = Σ_j e^{x_j − μ},
//   softmax:     y_j = e^{x_j − μ} · (1/s)
//   log-softmax: y_j = x_j − μ − ln s
// Row r's element j is read at strided(record of the rows, r) + j·stride (any input layout).
//
// Tiling: one workgroup of 64 invocations per row; each folds j = t, t+64, .. and a shared
// tree combines the 64 partials (max, then the sum).
//
// Bindings: 0 params [rows, d, stride, log, record], 1 y (read_write f32, contiguous), 2 x (read).
// Launch: one workgroup per row.

@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

@compute @workgroup_size(64)
fn softmax_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= params[0]) { return; }
    let d = params[1];
    let stride = params[2];
    let base = strided(params[4], row);
    var m = -f32_inf();
    for (var j = lid; j < d; j = j + 64u) {
        m = max(m, x[base + j * stride]);
    }
    m = tree_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < d; j = j + 64u) {
        s = s + exp(x[base + j * stride] - m);
    }
    s = tree_sum(lid, s);
    let o = row * d;
    if (params[3] != 0u) {
        let lse = log(s);
        for (var j = lid; j < d; j = j + 64u) {
            y[o + j] = x[base + j * stride] - m - lse;
        }
    } else {
        let inv = 1.0 / s;
        for (var j = lid; j < d; j = j + 64u) {
            y[o + j] = exp(x[base + j * stride] - m) * inv;
        }
    }
}
