// lora.wgsl — the fused LoRA linear: one matrix product over a concatenated shared dimension.
//
// Math: C = [P | s·Q] · [R ; S], i.e.
//     C[i, j] = Σ_{p<k1} P[i, p] · R[p, j]  +  s · Σ_{q<k2} Q[i, q] · S[q, j]
// with P [m, k1], R [k1, n], Q [m, k2] (contiguous), S [k2, n], C [m, n] contiguous.
// The LoRA forward is P = x, R = W0ᵀ, Q = u = xd Aᵀ (made beforehand by the plain matmul,
// [tokens, rank], small), S = Bᵀ: y = x W0ᵀ + s·u Bᵀ written once, and x W0ᵀ never exists on
// its own. The input gradient has the same form: dx = g W0 + s·(g B) A, with P = g, R = W0,
// Q = g B, S = A. P, R and S are read through (row stride, column stride, offset), so the
// transposed weights are read in place; R may be a frozen base weight kept as stored (f16/bf16 or
// quantised blocks), decoded on load by `load_w` (weights.wgsl), with accumulation in f32.
//
// Tiling (`lora`, as `matmul`): a workgroup of 8×8 invocations computes a 32×32 tile of C,
// each invocation a 4×4 block (rows ty + 8r, columns tx + 8c). The shared dimension is walked
// in 16-wide slices staged in workgroup memory: first ⌈k1/16⌉ slices of P and R, then ⌈k2/16⌉
// slices of s·Q and S (the low-rank part starts at a slice boundary, so every slice reads one
// pair of operands and the branch is uniform across the workgroup).
//
// Simple variant `lora_reg` (software adapters, as `matmul_reg`): the same tile and 4×4 block
// per invocation (rows 4·ty + r, columns 4·tx + c), operands read straight from the buffers,
// one loop over k1 and one over k2, no workgroup memory or barriers.
//
// Bindings: 0 params [m, n, k1, k2, p_rs, p_cs, r_rs, r_cs, s_rs, s_cs, r_format (the
//           W_FORMAT code of weights.wgsl), scale (f32 bits), p_off, r_off, s_off],
//           1 C (read_write f32), 2 P (read f32), 3 R (read through `load_w`),
//           4 Q (read f32, contiguous [m, k2]), 5 S (read f32).
// Launch: (⌈n/32⌉, ⌈m/32⌉, 1) workgroups of 64.

@group(0) @binding(1) var<storage, read_write> c: array<f32>;
@group(0) @binding(2) var<storage, read> pm: array<f32>;
@group(0) @binding(3) var<storage, read> wq: array<u32>; // R, read by load_w (weights.wgsl)
@group(0) @binding(4) var<storage, read> qm: array<f32>;
@group(0) @binding(5) var<storage, read> sm: array<f32>;

const TM: u32 = 32u;
const TN: u32 = 32u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 512>; // [TK][TM]
var<workgroup> Bs: array<f32, 512>; // [TK][TN]

@compute @workgroup_size(64)
fn lora(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = params[0];
    let n = params[1];
    let k1 = params[2];
    let k2 = params[3];
    let p_rs = params[4];
    let p_cs = params[5];
    let r_rs = params[6];
    let r_cs = params[7];
    let s_rs = params[8];
    let s_cs = params[9];
    let scale = pf32(11u);
    let p0 = params[12];
    let r0 = params[13];
    let s0 = params[14];
    // The low-rank slices start at k1 rounded up to a whole slice.
    let k1p = (k1 + TK - 1u) / TK * TK;
    let kt = k1p + k2;
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
    for (var k0 = 0u; k0 < kt; k0 = k0 + TK) {
        let low_rank = k0 >= k1p;
        for (var q = 0u; q < 8u; q++) {
            let e = lid + 64u * q;
            // Left tile: e = row·TK + kk.
            let i = row0 + e / TK;
            let ak = e % TK;
            var av = 0.0;
            // Right tile: e = kk·TN + col.
            let bk = e / TN;
            let j = col0 + e % TN;
            var bv = 0.0;
            if (!low_rank) {
                if (i < m && k0 + ak < k1) {
                    av = pm[p0 + i * p_rs + (k0 + ak) * p_cs];
                }
                if (k0 + bk < k1 && j < n) {
                    bv = load_w(r0 + (k0 + bk) * r_rs + j * r_cs);
                }
            } else {
                let qa = k0 - k1p + ak;
                if (i < m && qa < k2) {
                    av = scale * qm[i * k2 + qa];
                }
                let qb = k0 - k1p + bk;
                if (qb < k2 && j < n) {
                    bv = sm[s0 + qb * s_rs + j * s_cs];
                }
            }
            As[ak * TM + e / TK] = av;
            Bs[bk * TN + e % TN] = bv;
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
                c[i * n + j] = acc[r][q];
            }
        }
    }
}

@compute @workgroup_size(64)
fn lora_reg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = params[0];
    let n = params[1];
    let k1 = params[2];
    let k2 = params[3];
    let p_rs = params[4];
    let p_cs = params[5];
    let r_rs = params[6];
    let r_cs = params[7];
    let s_rs = params[8];
    let s_cs = params[9];
    let scale = pf32(11u);
    let i0 = wid.y * TM + (lid / 8u) * 4u;
    let j0 = wid.x * TN + (lid % 8u) * 4u;
    // Rows/columns past the edge read row/column 0 (in bounds) and are not written.
    var rp: array<u32, 4>;
    var rq: array<u32, 4>;
    var cr: array<u32, 4>;
    var cs: array<u32, 4>;
    for (var r = 0u; r < 4u; r++) {
        let row_in = i0 + r < m;
        let col_in = j0 + r < n;
        rp[r] = params[12] + select(0u, (i0 + r) * p_rs, row_in);
        rq[r] = select(0u, (i0 + r) * k2, row_in);
        cr[r] = params[13] + select(0u, (j0 + r) * r_cs, col_in);
        cs[r] = params[14] + select(0u, (j0 + r) * s_cs, col_in);
    }
    var acc: array<array<f32, 4>, 4>;
    for (var r = 0u; r < 4u; r++) {
        for (var q = 0u; q < 4u; q++) {
            acc[r][q] = 0.0;
        }
    }
    for (var p = 0u; p < k1; p++) {
        var av: array<f32, 4>;
        var bv: array<f32, 4>;
        for (var r = 0u; r < 4u; r++) {
            av[r] = pm[rp[r] + p * p_cs];
            bv[r] = load_w(cr[r] + p * r_rs);
        }
        for (var r = 0u; r < 4u; r++) {
            for (var q = 0u; q < 4u; q++) {
                acc[r][q] = acc[r][q] + av[r] * bv[q];
            }
        }
    }
    for (var p = 0u; p < k2; p++) {
        var av: array<f32, 4>;
        var bv: array<f32, 4>;
        for (var r = 0u; r < 4u; r++) {
            av[r] = scale * qm[rq[r] + p];
            bv[r] = sm[cs[r] + p * s_rs];
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
                c[(i0 + r) * n + j0 + q] = acc[r][q];
            }
        }
    }
}
