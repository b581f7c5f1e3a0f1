// unary.wgsl — element-wise functions of one tensor.
//
// Math: y[i] = f(x[strided(i)]) with f chosen by params[1]:
//   0 −x   1 eˣ   2 ln x   3 √x   4 1/√x   5 1/x   6 x²   7 |x|   8 sign x (0 for 0 and NaN)
//   9 tanh x = sign(x)(1 − e^{−2|x|})/(1 + e^{−2|x|}) (Taylor series below |x| = 0.3)
//   10 σ(x) = 1/(1 + e^{−x}) (x ≥ 0), eˣ/(1 + eˣ) (x < 0): exp of non-positive numbers only
//   11 erf x: Taylor series below |x| = 0.5, else 1 − erfc(|x|) with the Chebyshev fit of
//      Numerical Recipes (erfc relative error < 1.2e-7)
//   12 max(x, 0)   13 x Φ(x) = x/2 (1 + erf(x/√2))   14 x/2 (1 + tanh(√(2/π)(x + 0.044715x³)))
//   15 x σ(x)   16 xᵖ (p = a; negative x only for integral p, as powf)   17 a·x + b
//   18 clamp to [a, b]   19 (x ∘ a) as 1.0/0.0, ∘ = params[4]: = ≠ < ≤ > ≥
//
// Bindings: 0 params [n, op, a, b, cmp, record], 1 y (read_write f32), 2 x (read f32).
// Launch: 1-d, 256 invocations per workgroup, one element each.

@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

fn tanh_f(v: f32) -> f32 {
    let z = abs(v);
    if (z < 0.3) {
        let s = v * v;
        return v * (1.0 + s * (-1.0 / 3.0 + s * (2.0 / 15.0 + s * (-17.0 / 315.0 + s * (62.0 / 2835.0 + s * (-1382.0 / 155925.0))))));
    }
    let t = exp(-2.0 * z);
    return sign(v) * (1.0 - t) / (1.0 + t);
}

fn sigmoid_f(v: f32) -> f32 {
    if (v >= 0.0) {
        return 1.0 / (1.0 + exp(-v));
    }
    let e = exp(v);
    return e / (1.0 + e);
}

fn erf_f(v: f32) -> f32 {
    let z = abs(v);
    if (z < 0.5) {
        let s = v * v;
        // 2/√π (x − x³/3 + x⁵/10 − x⁷/42 + x⁹/216 − x¹¹/1320)
        return 1.1283791670955126 * v * (1.0 + s * (-1.0 / 3.0 + s * (1.0 / 10.0 + s * (-1.0 / 42.0 + s * (1.0 / 216.0 + s * (-1.0 / 1320.0))))));
    }
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, v >= 0.0);
}

fn powf_f(v: f32, p: f32) -> f32 {
    if (p == 0.0) { return 1.0; }
    if (v == 0.0) {
        if (p > 0.0) { return 0.0; }
        return f32_inf();
    }
    let a = pow(abs(v), p);
    if (v > 0.0) { return a; }
    if (fract(p) == 0.0) {
        let odd = fract(p * 0.5) != 0.0;
        return select(a, -a, odd);
    }
    return f32_nan();
}

fn cmp_f(op: u32, a: f32, b: f32) -> f32 {
    var r = false;
    switch op {
        case 0u: { r = a == b; }
        case 1u: { r = a != b; }
        case 2u: { r = a < b; }
        case 3u: { r = a <= b; }
        case 4u: { r = a > b; }
        default: { r = a >= b; }
    }
    return select(0.0, 1.0, r);
}

fn apply(op: u32, v: f32, a: f32, b: f32, c: u32) -> f32 {
    switch op {
        case 0u: { return -v; }
        case 1u: { return exp(v); }
        case 2u: { return log(v); }
        case 3u: { return sqrt(v); }
        case 4u: { return 1.0 / sqrt(v); }
        case 5u: { return 1.0 / v; }
        case 6u: { return v * v; }
        case 7u: { return abs(v); }
        case 8u: { return select(select(0.0, -1.0, v < 0.0), 1.0, v > 0.0); }
        case 9u: { return tanh_f(v); }
        case 10u: { return sigmoid_f(v); }
        case 11u: { return erf_f(v); }
        case 12u: { return select(0.0, v, v > 0.0); }
        case 13u: { return 0.5 * v * (1.0 + erf_f(v * 0.7071067811865476)); }
        case 14u: { return 0.5 * v * (1.0 + tanh_f(0.7978845608028654 * (v + 0.044715 * v * v * v))); }
        case 15u: { return v * sigmoid_f(v); }
        case 16u: { return powf_f(v, a); }
        case 17u: { return a * v + b; }
        case 18u: { return select(select(v, b, v > b), a, v < a); }
        default: { return cmp_f(c, v, a); }
    }
}

@compute @workgroup_size(256)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i >= params[0]) { return; }
    y[i] = apply(params[1], x[strided(params[5], i)], pf32(2u), pf32(3u), params[4]);
}
