// norm.wgsl — layer norm and RMS norm over the last axis, forward and backward.
//
// Math (per row x of length d; RMS norm takes μ = 0):
//   forward:  μ = Σx/d,  σ² = Σ(x − μ)²/d,  r = 1/√(σ² + eps),  x̂ = (x − μ)·r,
//             y = x̂ ⊙ w + b  (w, b optional);  saves μ and r per row
//   backward: ĝ = g ⊙ w,  dx = r·(ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))   (RMS: no mean(ĝ) term)
//   params:   dw_j = Σ_rows g_j x̂_j,  db_j = Σ_rows g_j
// Rows of x and g are read through their layouts (record of the rows + stride of the last axis).
//
// Tiling: forward and dx: one workgroup of 64 per row, shared trees for the two row sums
// (two passes for the variance, so no cancellation). dw/db: one invocation per column,
// looping over the rows in order (deterministic).
//
// Bindings: 1 y|dx (read_write), 2 mean out, 3 rstd out (read_write), 4 x, 5 w, 6 b, 7 g,
//           8 mean in, 9 rstd in (read), 10 dw, 11 db (read_write).
// params: norm_fwd  [rows, d, stride_x, eps, rms, has_w, has_b, rec_x]
//         norm_bwd  [rows, d, stride_x, stride_g, rms, has_w, rec_x, rec_g]
//         norm_wgrad [rows, d, stride_x, stride_g, 0, 0, rec_x, rec_g]
// Launch: fwd/bwd one workgroup per row; wgrad 1-d over the d columns, 64 per workgroup.

@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read> g: array<f32>;
@group(0) @binding(8) var<storage, read> mean_in: array<f32>;
@group(0) @binding(9) var<storage, read> rstd_in: array<f32>;
@group(0) @binding(10) var<storage, read_write> dw: array<f32>;
@group(0) @binding(11) var<storage, read_write> db: array<f32>;

@compute @workgroup_size(64)
fn norm_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= params[0]) { return; }
    let d = params[1];
    let sx = params[2];
    let eps = pf32(3u);
    let rms = params[4] != 0u;
    let base = strided(params[7], row);
    let dn = f32(d);
    var mu = 0.0;
    if (!rms) {
        var s = 0.0;
        for (var j = lid; j < d; j = j + 64u) {
            s = s + x[base + j * sx];
        }
        mu = tree_sum(lid, s) / dn;
    }
    var q = 0.0;
    for (var j = lid; j < d; j = j + 64u) {
        let c = x[base + j * sx] - mu;
        q = q + c * c;
    }
    let r = 1.0 / sqrt(tree_sum(lid, q) / dn + eps);
    if (lid == 0u) {
        mean_out[row] = mu;
        rstd_out[row] = r;
    }
    let o = row * d;
    for (var j = lid; j < d; j = j + 64u) {
        var h = (x[base + j * sx] - mu) * r;
        if (params[5] != 0u) { h = h * w[j]; }
        if (params[6] != 0u) { h = h + bias[j]; }
        y[o + j] = h;
    }
}

@compute @workgroup_size(64)
fn norm_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= params[0]) { return; }
    let d = params[1];
    let sx = params[2];
    let sg = params[3];
    let rms = params[4] != 0u;
    let has_w = params[5] != 0u;
    let bx = strided(params[6], row);
    let bg = strided(params[7], row);
    let mu = mean_in[row];
    let r = rstd_in[row];
    var s_g = 0.0;
    var s_gx = 0.0;
    for (var j = lid; j < d; j = j + 64u) {
        var gh = g[bg + j * sg];
        if (has_w) { gh = gh * w[j]; }
        s_g = s_g + gh;
        s_gx = s_gx + gh * (x[bx + j * sx] - mu) * r;
    }
    let dn = f32(d);
    var m_g = tree_sum(lid, s_g) / dn;
    if (rms) { m_g = 0.0; }
    let m_gx = tree_sum(lid, s_gx) / dn;
    let o = row * d;
    for (var j = lid; j < d; j = j + 64u) {
        var gh = g[bg + j * sg];
        if (has_w) { gh = gh * w[j]; }
        y[o + j] = r * (gh - m_g - (x[bx + j * sx] - mu) * r * m_gx);
    }
}

@compute @workgroup_size(64)
fn norm_wgrad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = group_index(wid, nwg) * 64u + lid;
    let d = params[1];
    if (j >= d) { return; }
    let sx = params[2];
    let sg = params[3];
    var aw = 0.0;
    var ab = 0.0;
    for (var row = 0u; row < params[0]; row++) {
        let gv = g[strided(params[7], row) + j * sg];
        aw = aw + gv * (x[strided(params[6], row) + j * sx] - mean_in[row]) * rstd_in[row];
        ab = ab + gv;
    }
    dw[j] = aw;
    db[j] = ab;
}
