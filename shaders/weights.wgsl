// weights.wgsl — how the product kernels (matmul, lora, gated) read their weight operand: one
// decoder per storage format, chosen when the pipeline is built. The launcher writes
//     const W_FORMAT: u32 = <code>u;
// before this file (after common.wgsl), and the kernel declares the weight's binding as
// `wq: array<u32>`. `load_w(i)` is element i of the weight, i being the flat row-major index
// of the stored matrix, so transposed and narrowed views are read through their strides and
// every format serves both operand orders (forward `x · Wᵀ` and the input gradient `g · W`).
// Accumulation stays f32 in the kernels; nothing here writes a decoded copy.
//
// Dense (no header): f32 (code 0) one value per word; f16 (1) and bf16 (2) two per word,
// element i in the low half of word i/2 when i is even.
//
// Quantised matrices (`crate::quant::QMatrix::to_gpu_words`): a header of QHEAD words
//     [format, rows, cols, side, nf4 scales, nf4 codes, data bytes, 0]
// then the blocks exactly as stored (byte b of the blocks is byte b % 4 of word QHEAD + b / 4),
// then the side data from word `side`. Rows are whole blocks, so element i of a format with
// B elements per S-byte block lies in block g = i / B at position j = i % B, its block
// starting at byte g·S. The formulas are those of src/quant (ggml.rs, nf4.rs, int8.rs), with
// the products in the same order, so the values equal the CPU decoders' (a GPU may fuse a
// multiply-add, a last-bit difference):
//   Q8_0 (32, 34 B)  d · q[j]                             d f16 @0, q i8 @2
//   Q4_0 (32, 18 B)  d · (q − 8)                          d @0, nibbles @2: byte j%16, high if j ≥ 16
//   Q4_1 (32, 20 B)  d · q + m                            d @0, m @2, nibbles @4
//   Q5_0 (32, 22 B)  d · (q − 16), q = nib | bit_j(qh)·16  d @0, qh u32 @2, nibbles @6
//   Q5_1 (32, 24 B)  d · q + m                            d @0, m @2, qh @4, nibbles @8
//   Q2_K (256, 84 B) d·(sc & 15)·q − dmin·(sc >> 4)       16-element groups; scales @0, q @16, d @80, dmin @82
//   Q3_K (256,110 B) d·(s6 − 32)·(q2 − 4·(1 − hbit))      hmask @0, q @32, 6-bit scales @96, d @108
//   Q4_K (256,144 B) d·sc·q − dmin·m                      d @0, dmin @2, 6-bit sc/m pairs @4, q @16
//   Q5_K (256,176 B) as Q4_K with a fifth bit             qh @16, q @48
//   Q6_K (256,210 B) d·s8·(q − 32), q 6-bit               ql @0, qh @128, i8 scales @192, d @208
//   NF4  (64)        LEVELS[q] · c, c = code[c8] · a256 + offset (double-quantised absmax)
//   int8 (row)       q · s_row

const WF_F32: u32 = 0u;
const WF_F16: u32 = 1u;
const WF_BF16: u32 = 2u;
const WF_NF4: u32 = 3u;
const WF_INT8: u32 = 4u;
// GGML block formats: 100 + the GGML type id.
const WF_Q4_0: u32 = 102u;
const WF_Q4_1: u32 = 103u;
const WF_Q5_0: u32 = 106u;
const WF_Q5_1: u32 = 107u;
const WF_Q8_0: u32 = 108u;
const WF_Q2_K: u32 = 110u;
const WF_Q3_K: u32 = 111u;
const WF_Q4_K: u32 = 112u;
const WF_Q5_K: u32 = 113u;
const WF_Q6_K: u32 = 114u;

const QHEAD: u32 = 8u;

// Byte `at` of the blocks.
fn qbyte(at: u32) -> u32 {
    return (wq[QHEAD + (at >> 2u)] >> ((at & 3u) * 8u)) & 0xffu;
}

// Byte `at` as a signed 8-bit value.
fn qi8(at: u32) -> f32 {
    return f32(bitcast<i32>(qbyte(at) << 24u) >> 24u);
}

// The f16 at byte `at` (even: GGML blocks keep their f16 fields 2-byte aligned).
fn qf16(at: u32) -> f32 {
    return unpack2x16float(wq[QHEAD + (at >> 2u)] >> ((at & 2u) * 8u)).x;
}

// The little-endian u32 at byte `at` (any alignment).
fn qu32(at: u32) -> u32 {
    return qbyte(at) | (qbyte(at + 1u) << 8u) | (qbyte(at + 2u) << 16u) | (qbyte(at + 3u) << 24u);
}

// Nibble j (0..32) of the 16 bytes at `at`: byte j % 16, the high nibble for j ≥ 16.
fn nibble32(at: u32, j: u32) -> u32 {
    return (qbyte(at + (j & 15u)) >> ((j >> 4u) * 4u)) & 15u;
}

fn dq_q8_0(i: u32) -> f32 {
    let b = (i / 32u) * 34u;
    return qf16(b) * qi8(b + 2u + i % 32u);
}

fn dq_q4_0(i: u32) -> f32 {
    let b = (i / 32u) * 18u;
    return qf16(b) * f32(i32(nibble32(b + 2u, i % 32u)) - 8);
}

fn dq_q4_1(i: u32) -> f32 {
    let b = (i / 32u) * 20u;
    return qf16(b) * f32(nibble32(b + 4u, i % 32u)) + qf16(b + 2u);
}

fn dq_q5_0(i: u32) -> f32 {
    let b = (i / 32u) * 22u;
    let j = i % 32u;
    let q = nibble32(b + 6u, j) | (((qu32(b + 2u) >> j) & 1u) << 4u);
    return qf16(b) * f32(i32(q) - 16);
}

fn dq_q5_1(i: u32) -> f32 {
    let b = (i / 32u) * 24u;
    let j = i % 32u;
    let q = nibble32(b + 8u, j) | (((qu32(b + 4u) >> j) & 1u) << 4u);
    return qf16(b) * f32(q) + qf16(b + 2u);
}

// Q2_K and Q3_K split a super-block into two halves of 128, each into four 32-element columns
// `c` (bit shift 2c of the 2-bit values), each into two 16-element groups `sub`; the 2-bit
// value of position l of a group is at byte half·32 + sub·16 + l of `q`.
fn dq_q2_k(i: u32) -> f32 {
    let b = (i / 256u) * 84u;
    let j = i % 256u;
    let half = j / 128u;
    let c = (j % 128u) / 32u;
    let sub = (j % 32u) / 16u;
    let sc = qbyte(b + half * 8u + c * 2u + sub);
    let dl = qf16(b + 80u) * f32(sc & 15u);
    let ml = qf16(b + 82u) * f32(sc >> 4u);
    let q = (qbyte(b + 16u + half * 32u + sub * 16u + j % 16u) >> (2u * c)) & 3u;
    return dl * f32(q) - ml;
}

fn dq_q3_k(i: u32) -> f32 {
    let b = (i / 256u) * 110u;
    let j = i % 256u;
    let half = j / 128u;
    let c = (j % 128u) / 32u;
    let e = j % 32u;
    let s = half * 8u + c * 2u + e / 16u;
    // Scale s: its low four bits in the nibble s / 8 of byte s % 8, its top two at bit
    // 2·(s / 4) of byte 8 + s % 4 (of the 12 scale bytes).
    let low = (qbyte(b + 96u + s % 8u) >> ((s / 8u) * 4u)) & 15u;
    let high = (qbyte(b + 104u + s % 4u) >> (2u * (s / 4u))) & 3u;
    let dl = qf16(b + 108u) * f32(i32(low | (high << 4u)) - 32);
    let q = i32((qbyte(b + 32u + half * 32u + e) >> (2u * c)) & 3u);
    let hbit = qbyte(b + e) & (1u << (half * 4u + c));
    return dl * f32(q - select(4, 0, hbit != 0u));
}

// Scale and min of sub-block s (0..8) of a Q4_K/Q5_K super-block from its 12 bytes at `at`:
// s < 4 in the low six bits of bytes s and s + 4; s ≥ 4 in the nibbles of byte s + 4 with
// their top two bits in the top bits of bytes s − 4 and s.
fn k4_scale_min(at: u32, s: u32) -> vec2<u32> {
    if (s < 4u) {
        return vec2<u32>(qbyte(at + s) & 63u, qbyte(at + s + 4u) & 63u);
    }
    let lo = qbyte(at + s + 4u);
    return vec2<u32>((lo & 15u) | ((qbyte(at + s - 4u) >> 6u) << 4u), (lo >> 4u) | ((qbyte(at + s) >> 6u) << 4u));
}

// Q4_K/Q5_K: sub-block s = j / 32 of 32 elements; the 32 bytes of `q` at 32·(s / 2) hold
// sub-block s in their low (s even) or high (s odd) nibbles.
fn dq_q4_k(i: u32) -> f32 {
    let b = (i / 256u) * 144u;
    let j = i % 256u;
    let s = j / 32u;
    let sm = k4_scale_min(b + 4u, s);
    let q = (qbyte(b + 16u + (s / 2u) * 32u + j % 32u) >> ((s & 1u) * 4u)) & 15u;
    return qf16(b) * f32(sm.x) * f32(q) - qf16(b + 2u) * f32(sm.y);
}

fn dq_q5_k(i: u32) -> f32 {
    let b = (i / 256u) * 176u;
    let j = i % 256u;
    let s = j / 32u;
    let l = j % 32u;
    let sm = k4_scale_min(b + 4u, s);
    let q = ((qbyte(b + 48u + (s / 2u) * 32u + l) >> ((s & 1u) * 4u)) & 15u) | (((qbyte(b + 16u + l) >> s) & 1u) << 4u);
    return qf16(b) * f32(sm.x) * f32(q) - qf16(b + 2u) * f32(sm.y);
}

// Q6_K: each half of 128 uses 64 bytes of `ql` and 32 of `qh`; element 32k + l of a half takes
// the low (k < 2) or high nibble of ql[l + 32·(k & 1)] and bits 2k..2k+2 of qh[l].
fn dq_q6_k(i: u32) -> f32 {
    let b = (i / 256u) * 210u;
    let j = i % 256u;
    let half = j / 128u;
    let k = (j % 128u) / 32u;
    let l = j % 32u;
    let low = (qbyte(b + half * 64u + l + 32u * (k & 1u)) >> (4u * (k / 2u))) & 15u;
    let high = (qbyte(b + 128u + half * 32u + l) >> (2u * k)) & 3u;
    let sc = qi8(b + 192u + half * 8u + l / 16u + 2u * k);
    return qf16(b + 208u) * sc * f32(i32(low | (high << 4u)) - 32);
}

// The sixteen NF4 levels (src/quant/nf4.rs LEVELS).
var<private> NF4_LEVELS: array<f32, 16> = array<f32, 16>(
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
);

// NF4: two values per byte, the even element in the high nibble; the block's absmax from its
// 8-bit code: side = [offset, code[256]], then one f32 per 256 blocks, then the codes.
fn dq_nf4(i: u32) -> f32 {
    let g = i / 64u;
    let byte = qbyte(i >> 1u);
    let q = select(byte & 15u, byte >> 4u, (i & 1u) == 0u);
    let side = wq[3];
    let code = (wq[wq[5] + (g >> 2u)] >> ((g & 3u) * 8u)) & 0xffu;
    let c = bitcast<f32>(wq[side + 1u + code]) * bitcast<f32>(wq[wq[4] + g / 256u]) + bitcast<f32>(wq[side]);
    return NF4_LEVELS[q] * c;
}

fn dq_int8(i: u32) -> f32 {
    return qi8(i) * bitcast<f32>(wq[wq[3] + i / wq[2]]);
}

fn load_w(i: u32) -> f32 {
    if (W_FORMAT == WF_F32) {
        return bitcast<f32>(wq[i]);
    }
    if (W_FORMAT == WF_F16 || W_FORMAT == WF_BF16) {
        let h = (wq[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
        if (W_FORMAT == WF_F16) {
            return unpack2x16float(h).x;
        }
        return bitcast<f32>(h << 16u);
    }
    if (W_FORMAT == WF_Q8_0) { return dq_q8_0(i); }
    if (W_FORMAT == WF_Q4_0) { return dq_q4_0(i); }
    if (W_FORMAT == WF_Q4_1) { return dq_q4_1(i); }
    if (W_FORMAT == WF_Q5_0) { return dq_q5_0(i); }
    if (W_FORMAT == WF_Q5_1) { return dq_q5_1(i); }
    if (W_FORMAT == WF_Q2_K) { return dq_q2_k(i); }
    if (W_FORMAT == WF_Q3_K) { return dq_q3_k(i); }
    if (W_FORMAT == WF_Q4_K) { return dq_q4_k(i); }
    if (W_FORMAT == WF_Q5_K) { return dq_q5_k(i); }
    if (W_FORMAT == WF_Q6_K) { return dq_q6_k(i); }
    if (W_FORMAT == WF_NF4) { return dq_nf4(i); }
    return dq_int8(i);
}
