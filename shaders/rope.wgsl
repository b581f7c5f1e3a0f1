// rope.wgsl — rotary position embedding of x[.., seq, dim].
//
// Math: for row r (position p = r mod seq) and pair i < dim/2 with (a, b) = (2i, 2i+1)
// (interleaved) or (i, i + dim/2) (half split), c = cos[p, i], s = ±sin[p, i] (− for the
// inverse rotation, the backward pass):
//   y_a = x_a·c − x_b·s,   y_b = x_b·c + x_a·s
// x is read through its layout (record of the rows + stride of the last axis); cos/sin are
// contiguous [seq, dim/2]; y is contiguous.
//
// Bindings: 0 params [rows·dim/2, seq, dim, interleaved, inverse, stride, record],
//           1 y (read_write), 2 x, 3 cos, 4 sin (read).
// Launch: 1-d, 256 invocations per workgroup, one pair each.

@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> cos_t: array<f32>;
@group(0) @binding(4) var<storage, read> sin_t: array<f32>;

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = group_index(wid, nwg) * 256u + lid;
    if (e >= params[0]) { return; }
    let seq = params[1];
    let dim = params[2];
    let half_d = dim / 2u;
    let row = e / half_d;
    let i = e % half_d;
    let p = row % seq;
    let c = cos_t[p * half_d + i];
    var s = sin_t[p * half_d + i];
    if (params[4] != 0u) { s = -s; }
    var ia = i;
    var ib = i + half_d;
    if (params[3] != 0u) {
        ia = 2u * i;
        ib = 2u * i + 1u;
    }
    let base = strided(params[6], row);
    let st = params[5];
    let xa = x[base + ia * st];
    let xb = x[base + ib * st];
    y[row * dim + ia] = xa * c - xb * s;
    y[row * dim + ib] = xb * c + xa * s;
}
