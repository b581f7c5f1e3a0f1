// copy.wgsl — fill, strided copy / dtype cast, and one part of a concat.
//
// Math:
//   fill:        dst[w] = word                                  (a 32-bit pattern; for 16-bit
//                                                                dtypes two copies of the half)
//   cast_copy:      dst[i] = convert(src[strided(i)])               for i < n, any dtype pair among
//                f32 (0), f16 (1), bf16 (2), u32 (3), i32 (4); the same dtype is a bit copy.
//                Float → 16-bit rounds to nearest even; float → int truncates toward zero and
//                saturates (NaN → 0), as Rust's `as` on the CPU.
//   concat_part: dst[b·total + start + r] = src[strided(b·rows + r)]   (32-bit elements)
//
// Storage: every buffer is array<u32>; 16-bit element i is half (i & 1) of word i >> 1
// (little endian, as the host uploads it).
//
// Bindings: 0 params, 1 dst (read_write), 2 src (read; not used by fill).
// Launch: 1-d, 256 invocations per workgroup, one per output word (cast with a 16-bit
// destination writes two elements per invocation, so no two invocations share a word).
//
// params:
//   fill:        [n_words, word]
//   cast_copy:      [n, src_dtype, dst_dtype, record]
//   concat_part: [n, rows, total, start, record]

@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;

fn load_bits16(i: u32) -> u32 {
    return (src[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
}

fn load_f32(dt: u32, i: u32) -> f32 {
    switch dt {
        case 0u: { return bitcast<f32>(src[i]); }
        case 1u: { return unpack2x16float(load_bits16(i)).x; }
        case 2u: { return bitcast<f32>(load_bits16(i) << 16u); }
        case 3u: { return f32(src[i]); }
        default: { return f32(bitcast<i32>(src[i])); }
    }
}

// f32 → IEEE binary16 bits, round to nearest even, overflow to ±∞, NaN kept quiet.
fn f32_to_f16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let e = i32((b >> 23u) & 0xffu);
    let m = b & 0x7fffffu;
    if (e == 255) {
        return sign | 0x7c00u | select(0u, 0x200u, m != 0u);
    }
    let ne = e - 112; // rebias 127 → 15
    if (ne >= 31) {
        return sign | 0x7c00u;
    }
    if (ne <= 0) {
        if (ne < -10) {
            return sign;
        }
        let mm = m | 0x800000u;
        let shift = u32(14 - ne);
        var r = mm >> shift;
        let rem = mm & ((1u << shift) - 1u);
        let hw = 1u << (shift - 1u);
        if (rem > hw || (rem == hw && (r & 1u) == 1u)) {
            r = r + 1u;
        }
        return sign | r;
    }
    var r = (u32(ne) << 10u) | (m >> 13u);
    let rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u) == 1u)) {
        r = r + 1u; // a carry into the exponent is the right answer, up to ∞
    }
    return sign | r;
}

// f32 → bfloat16 bits, round to nearest even, NaN kept quiet.
fn f32_to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (is_nan(x)) {
        return ((b >> 16u) | 0x40u) & 0xffffu;
    }
    return ((b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u) & 0xffffu;
}

// Element `i` of src (dtype sdt) as the bits of dtype ddt (16-bit results in the low half).
fn convert(sdt: u32, ddt: u32, i: u32) -> u32 {
    if (sdt == ddt) {
        if (sdt == 1u || sdt == 2u) {
            return load_bits16(i);
        }
        return src[i];
    }
    if (sdt == 3u && ddt == 4u) {
        return min(src[i], 0x7fffffffu);
    }
    if (sdt == 4u && ddt == 3u) {
        let v = bitcast<i32>(src[i]);
        return select(u32(v), 0u, v < 0);
    }
    let x = load_f32(sdt, i);
    switch ddt {
        case 0u: { return bitcast<u32>(x); }
        case 1u: { return f32_to_f16(x); }
        case 2u: { return f32_to_bf16(x); }
        case 3u: {
            if (is_nan(x) || x <= 0.0) { return 0u; }
            if (x >= 4294967296.0) { return 0xffffffffu; }
            return u32(x);
        }
        default: {
            if (is_nan(x)) { return 0u; }
            if (x >= 2147483648.0) { return 0x7fffffffu; }
            if (x <= -2147483648.0) { return 0x80000000u; }
            return bitcast<u32>(i32(x));
        }
    }
}

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = group_index(wid, nwg) * 256u + lid;
    if (w >= params[0]) { return; }
    dst[w] = params[1];
}

@compute @workgroup_size(256)
fn cast_copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = group_index(wid, nwg) * 256u + lid;
    let n = params[0];
    let sdt = params[1];
    let ddt = params[2];
    let rec = params[3];
    if (ddt == 1u || ddt == 2u) {
        let i = 2u * w;
        if (i >= n) { return; }
        var word = convert(sdt, ddt, strided(rec, i));
        if (i + 1u < n) {
            word = word | (convert(sdt, ddt, strided(rec, i + 1u)) << 16u);
        }
        dst[w] = word;
    } else {
        if (w >= n) { return; }
        dst[w] = convert(sdt, ddt, strided(rec, w));
    }
}

@compute @workgroup_size(256)
fn concat_part(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = group_index(wid, nwg) * 256u + lid;
    if (e >= params[0]) { return; }
    let rows = params[1];
    let b = e / rows;
    let r = e % rows;
    dst[b * params[2] + params[3] + r] = src[strided(params[4], e)];
}
