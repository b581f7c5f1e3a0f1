// glu.wgsl — the gated activation of a gated MLP (SwiGLU, GeGLU), forward and backward.
//
// Math, element-wise, with act chosen by params[1] (0 SiLU, 1 GELU-tanh):
//   forward    y  = act(g) · u
//   backward   du = act(g) · dy,   dg = act'(g) · u · dy
//   SiLU       act(x) = x σ(x),  act'(x) = σ(x) (1 + x (1 − σ(x)))
//   GELU-tanh  act(x) = ½x(1 + t),  t = tanh(c(x + 0.044715x³)),  c = √(2/π)
//              act'(x) = ½(1 + t) + ½x(1 − t²) c (1 + 3·0.044715x²)
//
// Bindings: 0 params [n, act, off0, off1, off2] (element offsets of the inputs, in binding
// order), 1 out0 (read_write f32), 2 out1 (read_write f32, backward only), 3 g, 4 u,
// 5 dy (backward only). Entry points: `glu` writes y to out0; `glu_backward` writes dg to
// out0 and du to out1. Launch: 1-d, 256 invocations per workgroup, one element each.

@group(0) @binding(1) var<storage, read_write> out0: array<f32>;
@group(0) @binding(2) var<storage, read_write> out1: array<f32>;
@group(0) @binding(3) var<storage, read> g_in: array<f32>;
@group(0) @binding(4) var<storage, read> u_in: array<f32>;
@group(0) @binding(5) var<storage, read> dy_in: array<f32>;

fn glu_sigmoid(v: f32) -> f32 {
    // exp of a non-positive number only, so neither tail overflows.
    let e = exp(-abs(v));
    let p = 1.0 / (1.0 + e);
    return select(e * p, p, v >= 0.0);
}

fn glu_tanh(z: f32) -> f32 {
    let e = exp(-2.0 * abs(z));
    return sign(z) * (1.0 - e) / (1.0 + e);
}

// (act(x), act'(x))
fn act_and_slope(x: f32) -> vec2<f32> {
    if (params[1] == 0u) {
        let s = glu_sigmoid(x);
        return vec2<f32>(x * s, s * (1.0 + x * (1.0 - s)));
    }
    let c = 0.7978845608028654;
    let a = 0.044715;
    let x2 = x * x;
    let t = glu_tanh(c * x * (1.0 + a * x2));
    return vec2<f32>(0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * a * x2));
}

@compute @workgroup_size(256)
fn glu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i >= params[0]) { return; }
    let a = act_and_slope(g_in[params[2] + i]);
    out0[i] = a.x * u_in[params[3] + i];
}

@compute @workgroup_size(256)
fn glu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i >= params[0]) { return; }
    let a = act_and_slope(g_in[params[2] + i]);
    let dy = dy_in[params[4] + i];
    out1[i] = a.x * dy;
    out0[i] = a.y * u_in[params[3] + i] * dy;
}
