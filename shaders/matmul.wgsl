// matmul.wgsl — batched matrix product C[z] = A[z] · B[z].
//
// Math: C[z, i, j] = Σ_p A[z, i, p] · B[z, p, j], A [m, k], B [k, n], C [m, n] contiguous.
// A and B are read through their strides (row stride, column stride), so a transposed operand
// is read in place; the batch offsets come from layout records of the batch axes (a broadcast
// batch axis has stride 0).
//
// Tiling: a workgroup of 8×8 invocations computes a 32×32 tile of C. For each 16-wide slice of
// the shared dimension it stages A[32×16] and B[16×32] in workgroup memory (each invocation
// loads 8 + 8 elements, zero outside the matrix), then every invocation accumulates a 4×4 block
// of outputs in registers: rows ty + 8r, columns tx + 8c (r, c < 4). Per staged slice an
// invocation does 16·(4 + 4) shared loads for 16·16 multiply-adds.
//
// Simple variant `matmul_reg` (kept beside the tiled one, and used on software adapters, where
// workgroup memory and barriers are slow): the same 32×32 tile per workgroup and 4×4 outputs
// per invocation — rows 4·ty + r, columns 4·tx + c — but every operand is read straight from
// the buffers (8 loads per 16 multiply-adds), no workgroup memory, no barriers.
//
// Bindings: 0 params [m, n, k, a_rs, a_cs, b_rs, b_cs, rec_batch_a, rec_batch_b, b_dtype,
//           z0 (first batch index of this launch: batches beyond the z limit are split)],
//           1 C (read_write f32), 2 A (read f32), 3 B (read through `load_w`: f32, a frozen
//           weight's f16/bf16 pairs, or its quantised blocks; weights.wgsl, which the launcher
//           prepends with B's format as W_FORMAT — params[9] repeats that code).
// Launch: (⌈n/32⌉, ⌈m/32⌉, batch) workgroups of 64 (several launches when batch > 65535).

@group(0) @binding(1) var<storage, read_write> c: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> wq: array<u32>; // B, read by load_w (weights.wgsl)

const TM: u32 = 32u;
const TN: u32 = 32u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 512>; // [TK][TM]
var<workgroup> Bs: array<f32, 512>; // [TK][TN]

@compute @workgroup_size(64)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = params[0];
    let n = params[1];
    let k = params[2];
    let a_rs = params[3];
    let a_cs = params[4];
    let b_rs = params[5];
    let b_cs = params[6];
    let z = params[10] + wid.z;
    let a0 = strided(params[7], z);
    let b0 = strided(params[8], z);
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
            // A tile: e = row·TK + kk
            let ar = e / TK;
            let ak = e % TK;
            var av = 0.0;
            if (row0 + ar < m && k0 + ak < k) {
                av = a[a0 + (row0 + ar) * a_rs + (k0 + ak) * a_cs];
            }
            As[ak * TM + ar] = av;
            // B tile: e = kk·TN + col
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
    let cbase = z * m * n;
    for (var r = 0u; r < 4u; r++) {
        let i = row0 + ty + 8u * r;
        for (var q = 0u; q < 4u; q++) {
            let j = col0 + tx + 8u * q;
            if (i < m && j < n) {
                c[cbase + i * n + j] = acc[r][q];
            }
        }
    }
}

@compute @workgroup_size(64)
fn matmul_reg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = params[0];
    let n = params[1];
    let k = params[2];
    let a_rs = params[3];
    let a_cs = params[4];
    let b_rs = params[5];
    let b_cs = params[6];
    let z = params[10] + wid.z;
    let a0 = strided(params[7], z);
    let b0 = strided(params[8], z);
    let i0 = wid.y * TM + (lid / 8u) * 4u;
    let j0 = wid.x * TN + (lid % 8u) * 4u;
    // Rows/columns past the edge read row/column 0 (in bounds) and are not written.
    var ra: array<u32, 4>;
    var cb: array<u32, 4>;
    for (var r = 0u; r < 4u; r++) {
        ra[r] = a0 + select(0u, (i0 + r) * a_rs, i0 + r < m);
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
            av[r] = a[ra[r] + p * a_cs];
            bv[r] = load_w(cb[r] + p * b_rs);
        }
        for (var r = 0u; r < 4u; r++) {
            for (var q = 0u; q < 4u; q++) {
                acc[r][q] = acc[r][q] + av[r] * bv[q];
            }
        }
    }
    let cbase = z * m * n;
    for (var r = 0u; r < 4u; r++) {
        for (var q = 0u; q < 4u; q++) {
            if (i0 + r < m && j0 + q < n) {
                c[cbase + (i0 + r) * n + j0 + q] = acc[r][q];
            }
        }
    }
}
