// xent.wgsl — fused cross-entropy on logits, forward and backward, one workgroup per row.
//
// Math: for row r of logits x [n, c] with target t_r, μ = max_j x_j, s = Σ_j e^{x_j − μ}:
//   forward:  loss_r = μ + ln s − x_{t_r}                 (0 when t_r is the ignore index)
//   backward: dx_rj = e^{x_j − μ} · (g_r / s) − g_r·[j = t_r]   (0 for ignored rows)
// The softmax is never stored. Targets are u32/i32 words; a row is ignored when its raw word
// equals params[4] and params[3] = 1 (the ignore index is representable in the target dtype).
// Targets were range-checked on the host before the launch.
//
// Tiling: one workgroup of 64 per row, shared trees for μ and s.
// Bindings: 0 params, 1 out (read_write: losses [n] or dx [n, c]), 2 x, 3 targets (u32), 4 g (read).
// params: xent_fwd [rows, c, stride, has_ignore, ignore_word, rec_x, rec_t]
//         xent_bwd [rows, c, stride, has_ignore, ignore_word, rec_x, rec_t, rec_g]
// Launch: one workgroup per row.

@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> targets: array<u32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;

fn row_stats(lid: u32, base: u32, c: u32, stride: u32) -> vec2<f32> {
    var m = -f32_inf();
    for (var j = lid; j < c; j = j + 64u) {
        m = max(m, x[base + j * stride]);
    }
    m = tree_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < c; j = j + 64u) {
        s = s + exp(x[base + j * stride] - m);
    }
    s = tree_sum(lid, s);
    return vec2<f32>(m, s);
}

@compute @workgroup_size(64)
fn xent_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= params[0]) { return; }
    let c = params[1];
    let stride = params[2];
    let t = targets[strided(params[6], row)];
    let ignored = params[3] != 0u && t == params[4];
    let base = strided(params[5], row);
    let ms = row_stats(lid, base, c, stride);
    if (lid == 0u) {
        if (ignored) {
            out[row] = 0.0;
        } else {
            out[row] = ms.x + log(ms.y) - x[base + t * stride];
        }
    }
}

@compute @workgroup_size(64)
fn xent_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= params[0]) { return; }
    let c = params[1];
    let stride = params[2];
    let t = targets[strided(params[6], row)];
    let ignored = params[3] != 0u && t == params[4];
    let base = strided(params[5], row);
    let ms = row_stats(lid, base, c, stride);
    let gr = g[strided(params[7], row)];
    let scale = gr / ms.y;
    let o = row * c;
    for (var j = lid; j < c; j = j + 64u) {
        var v = exp(x[base + j * stride] - ms.x) * scale;
        if (j == t) { v = v - gr; }
        if (ignored) { v = 0.0; }
        out[o + j] = v;
    }
}
