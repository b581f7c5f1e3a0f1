// dequant.wgsl — a weight kept as stored (f16/bf16 or quantised blocks), decoded to f32 by the
// decoders of weights.wgsl (prepended by the launcher with the weight's W_FORMAT).
//
// Math:
//   dequant:      out[e] = W[strided(rec_w, e)]                 (any view: to_dtype(F32))
//   dequant_rows: out[j, c] = W[off + idx[j]·rs + c·cs]          (an embedding lookup: only
//                 the rows asked for are decoded)
//
// Bindings: 1 out (read_write f32), 2 wq (read: the weight's words), 3 idx (read u32).
// params: dequant [n, rec_w]; dequant_rows [n, cols, rs, cs, off, rec_idx].
// Launch: 1-d, 256 invocations per workgroup, one output element each.

@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> wq: array<u32>;
@group(0) @binding(3) var<storage, read> idx: array<u32>;

@compute @workgroup_size(256)
fn dequant(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = group_index(wid, nwg) * 256u + lid;
    if (e >= params[0]) { return; }
    out[e] = load_w(strided(params[1], e));
}

@compute @workgroup_size(256)
fn dequant_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = group_index(wid, nwg) * 256u + lid;
    if (e >= params[0]) { return; }
    let cols = params[1];
    let row = idx[strided(params[5], e / cols)];
    out[e] = load_w(params[4] + row * params[2] + (e % cols) * params[3]);
}
