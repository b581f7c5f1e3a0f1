// index.wgsl — index_select, gather, and their adjoints index_add / scatter_add.
//
// Math:
//   index_select: out[b, j, r] = x[b, idx[j], r]    (x viewed as [outer, d, inner]; 32-bit words)
//   gather:       out[e] = x[base(e) + idx[e]·stride_axis]  (base: x's strides on idx's shape,
//                 0 on the axis)
//   index_add:    out[b, i, r] = Σ_{j : idx[j] = i} g[b, j, r]
//   scatter_add:  out[o]       = Σ_{e : target(e) = o} src[e]
//
// Scheme of the adjoints (deterministic, no atomics): "sort-free two-pass CSR". The host counts
// the sources of every target (pass 1) and lists them in ascending source order (pass 2) —
// from the index tensor's host copy, which it already holds to range-check the indices — and
// uploads (rowptr, list). The kernel then gives each output element one invocation that sums
// its sources in that order, starting from 0: the same additions in the same order as the CPU
// kernel, so the results agree bit for bit, and no two invocations write the same element.
//
// Bindings: 1 out (read_write), 2 x | src (read), 3 idx (read u32), 4 rowptr, 5 list (read u32).
// params: index_select [n, d, inner, nidx, rec_x, rec_idx]
//         gather       [n, stride_axis, rec_base, rec_idx]
//         csr_sum      [n, mode (0 scatter, 1 index_add), d, inner, nidx, rec_src]
// Launch: 1-d, 256 invocations per workgroup, one output element each.

@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<u32>;
@group(0) @binding(3) var<storage, read> idx: array<u32>;
@group(0) @binding(4) var<storage, read> rowptr: array<u32>;
@group(0) @binding(5) var<storage, read> list: array<u32>;

@compute @workgroup_size(256)
fn index_select(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = group_index(wid, nwg) * 256u + lid;
    if (e >= params[0]) { return; }
    let d = params[1];
    let inner = params[2];
    let nidx = params[3];
    let r = e % inner;
    let t = e / inner;
    let j = t % nidx;
    let b = t / nidx;
    let i = idx[strided(params[5], j)];
    out[e] = x[strided(params[4], (b * d + i) * inner + r)];
}

@compute @workgroup_size(256)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = group_index(wid, nwg) * 256u + lid;
    if (e >= params[0]) { return; }
    out[e] = x[strided(params[2], e) + idx[strided(params[3], e)] * params[1]];
}

@compute @workgroup_size(256)
fn csr_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = group_index(wid, nwg) * 256u + lid;
    if (o >= params[0]) { return; }
    var acc = 0.0;
    if (params[1] == 0u) {
        for (var q = rowptr[o]; q < rowptr[o + 1u]; q++) {
            acc = acc + bitcast<f32>(x[strided(params[5], list[q])]);
        }
    } else {
        let d = params[2];
        let inner = params[3];
        let nidx = params[4];
        let r = o % inner;
        let t = o / inner;
        let i = t % d;
        let b = t / d;
        for (var q = rowptr[i]; q < rowptr[i + 1u]; q++) {
            acc = acc + bitcast<f32>(x[strided(params[5], (b * nidx + list[q]) * inner + r)]);
        }
    }
    out[o] = bitcast<u32>(acc);
}
