// gated.wgsl — the matrix product with gates in its prologue and epilogue (FineGates).
//
// Math: pre[i, j] = Σ_p A[i, p] · gc[p] · B[p, j] + bias[j],   C[i, j] = pre[i, j] · gr[j],
// A [m, k], B [k, n] read through their strides, gc [k] the column gates (a gate per element
// of the shared dimension), bias [n], gr [n] the row gates (a gate per output column); each of
// gc, bias and gr may be absent (flags), and pre is written only when asked (the backward of
// the row gates needs it: dgr[j] = Σ_i dC[i, j] · pre[i, j]). So FineGates' linear
// y = ((x ⊙ z_c) W0ᵀ + b) ⊙ z_r is one kernel with A = x, B = W0ᵀ, gc = z_c, gr = z_r, and its
// input gradient dx = ((dy ⊙ z_r) W0) ⊙ z_c the same kernel with A = dy, B = W0, gc = z_r,
// gr = z_c: no gate is ever a separate pass over a full-size tensor.
//
// The prologue scales each staged element of A by its column's gate as the tile is loaded; the
// epilogue adds the bias and scales by the row gate as the accumulators are written. The
// tiling is matmul.wgsl's: a workgroup of 8×8 invocations computes a 32×32 tile of C, 4×4
// outputs per invocation; `gated` stages 32×16 / 16×32 slices in workgroup memory, `gated_reg`
// (software adapters) reads the operands straight from the buffers.
//
// Bindings: 0 params [m, n, k, a_rs, a_cs, b_rs, b_cs, b_dtype, flags, a_off, b_off]
//           (flags: 1 gc, 2 bias, 4 gr, 8 write pre), 1 C (read_write f32), 2 A (f32),
//           3 B (read through `load_w`, weights.wgsl: f32, f16/bf16 pairs or quantised
//           blocks; b_dtype repeats the W_FORMAT code), 4 gc, 5 bias, 6 gr (f32; any buffer when
//           absent), 7 pre (read_write f32; a one-element buffer when not written).
// Launch: (⌈n/32⌉, ⌈m/32⌉, 1) workgroups of 64.

@group(0) @binding(1) var<storage, read_write> c: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> wq: array<u32>; // B, read by load_w (weights.wgsl)
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read> gr: array<f32>;
@group(0) @binding(7) var<storage, read_write> pre: array<f32>;

fn load_a(i: u32, p: u32) -> f32 {
    let v = a[params[9] + i * params[3] + p * params[4]];
    if ((params[8] & 1u) != 0u) {
        return v * gc[p];
    }
    return v;
}

// The epilogue: bias, the pre-gate value when asked, then the row gate.
fn store(i: u32, j: u32, acc: f32) {
    let flags = params[8];
    let n = params[1];
    var v = acc;
    if ((flags & 2u) != 0u) {
        v = v + bias[j];
    }
    if ((flags & 8u) != 0u) {
        pre[i * n + j] = v;
    }
    if ((flags & 4u) != 0u) {
        v = v * gr[j];
    }
    c[i * n + j] = v;
}

const TM: u32 = 32u;
const TN: u32 = 32u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 512>; // [TK][TM]
var<workgroup> Bs: array<f32, 512>; // [TK][TN]

@compute @workgroup_size(64)
fn gated(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = params[0];
    let n = params[1];
    let k = params[2];
    let b_rs = params[5];
    let b_cs = params[6];
    let b0 = params[10];
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let tx = lid % 8u;
    let ty = lid / 8u;
    var acc: array<array<f32, 4>, 4>;
    for (var r = 0u; r < 4u; r++) {
        for (var q = 0u; q < 4u; q++) {
            acc[r][q] = 0.0;
        }
    }
    for (var k0 = 0u; k0 < k; k0 = k0 + TK) {
        for (var q = 0u; q < 8u; q++) {
            let e = lid + 64u * q;
            let ar = e / TK;
            let ak = e % TK;
            var av = 0.0;
            if (row0 + ar < m && k0 + ak < k) {
                av = load_a(row0 + ar, k0 + ak);
            }
            As[ak * TM + ar] = av;
            let bk = e / TN;
            let bc = e % TN;
            var bv = 0.0;
            if (k0 + bk < k && col0 + bc < n) {
                bv = load_w(b0 + (k0 + bk) * b_rs + (col0 + bc) * b_cs);
            }
            Bs[bk * TN + bc] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var ar: array<f32, 4>;
            var br: array<f32, 4>;
            for (var r = 0u; r < 4u; r++) {
                ar[r] = As[kk * TM + ty + 8u * r];
                br[r] = Bs[kk * TN + tx + 8u * r];
            }
            for (var r = 0u; r < 4u; r++) {
                for (var q = 0u; q < 4u; q++) {
                    acc[r][q] = acc[r][q] + ar[r] * br[q];
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r++) {
        let i = row0 + ty + 8u * r;
        for (var q = 0u; q < 4u; q++) {
            let j = col0 + tx + 8u * q;
            if (i < m && j < n) {
                store(i, j, acc[r][q]);
            }
        }
    }
}

@compute @workgroup_size(64)
fn gated_reg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = params[0];
    let n = params[1];
    let k = params[2];
    let b_rs = params[5];
    let b_cs = params[6];
    let b0 = params[10];
    let i0 = wid.y * TM + (lid / 8u) * 4u;
    let j0 = wid.x * TN + (lid % 8u) * 4u;
    // Rows/columns past the edge read row/column 0 (in bounds) and are not written.
    var ra: array<u32, 4>;
    var cb: array<u32, 4>;
    for (var r = 0u; r < 4u; r++) {
        ra[r] = select(0u, i0 + r, i0 + r < m);
        cb[r] = b0 + select(0u, (j0 + r) * b_cs, j0 + r < n);
    }
    var acc: array<array<f32, 4>, 4>;
    for (var r = 0u; r < 4u; r++) {
        for (var q = 0u; q < 4u; q++) {
            acc[r][q] = 0.0;
        }
    }
    for (var p = 0u; p < k; p++) {
        var av: array<f32, 4>;
        var bv: array<f32, 4>;
        for (var r = 0u; r < 4u; r++) {
            av[r] = load_a(ra[r], p);
            bv[r] = load_w(cb[r] + p * b_rs);
        }
        for (var r = 0u; r < 4u; r++) {
            for (var q = 0u; q < 4u; q++) {
                acc[r][q] = acc[r][q] + av[r] * bv[q];
            }
        }
    }
    for (var r = 0u; r < 4u; r++) {
        for (var q = 0u; q < 4u; q++) {
            if (i0 + r < m && j0 + q < n) {
                store(i0 + r, j0 + q, acc[r][q]);
            }
        }
    }
}
