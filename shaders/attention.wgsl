// attention.wgsl — fused scaled dot-product attention (flash attention), forward and backward.
//
// Math, for query row i of head h (kv head g = h / (heads / kv_heads)), keys jj < tk:
//   s_j = scale · q_i · k_j        where i may see jj (see `sees`), else −∞
//   m   = max_j s_j,  l = Σ_j e^{s_j − m},  L_i = m + ln l,  o_i = Σ_j e^{s_j − m} v_j / l
//   a row that sees no key: o_i = mean_j v_j (every key), L_i = −∞
// The scores are never stored: the forward walks the keys in blocks of 64 with an online
// softmax (m and l rescaled as each block raises the maximum). Backward, with
// p_ij = e^{s_ij − L_i} recomputed, D_i = Σ_c dO_ic o_ic:
//   ds_ij = p_ij (dO_i · v_j − D_i) · scale        (0 on a row that sees no key)
//   dq_i = Σ_j ds_ij k_j,   dk_j = Σ_i ds_ij q_i,   dv_j = Σ_i p_ij dO_i   (p = 1/tk on such a row)
// in three launches: `attn_bwd_prep` (L and D per row), `attn_bwd_dq` (a workgroup per query
// row), `attn_bwd_dkv` (a workgroup per key row, over the queries of its kv head's group that
// can see it: without padding, the later ones under a causal mask, the earlier ones under a
// window, those of its own packed sequence), so no two workgroups write one value and no entry
// point binds more than 8 storage buffers.
//
// Mask (the rule of nn::Mask): the first `prefix` keys are seen by every query; real key
// j = jj − prefix is seen by query i (absolute position offset + i) when j ≤ offset + i
// (causal), j + window > offset + i (has_window), and keep[b, j] ≠ 0 (has_keep). With
// has_starts (several sequences packed into one row), the `keep` binding holds instead, for
// each real position p, the first position of p's sequence: query i sees real key j only when
// j ≥ starts[b, offset + i].
//
// Params: [b, h, hk, tq, tk, d, offset, prefix, causal, window, has_keep, scale (f32 bits),
// has_window, has_starts].
// q [b, h, tq, d], k and v [b, hk, tk, d], o [b, h, tq, d], all contiguous; d ≤ 256.
// Tiling: 64 invocations per workgroup; invocation t scores key (or query) t of a block, then
// accumulates output columns t, t+64, t+128, t+192.

@group(0) @binding(1) var<storage, read_write> o_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> lse_out: array<f32>;
@group(0) @binding(3) var<storage, read> q: array<f32>;
@group(0) @binding(4) var<storage, read> k: array<f32>;
@group(0) @binding(5) var<storage, read> v: array<f32>;
@group(0) @binding(6) var<storage, read> keep: array<f32>;
@group(0) @binding(7) var<storage, read> o_in: array<f32>;
@group(0) @binding(8) var<storage, read> go: array<f32>;
@group(0) @binding(9) var<storage, read> lse_in: array<f32>;
@group(0) @binding(10) var<storage, read_write> stats: array<f32>;
@group(0) @binding(11) var<storage, read> stats_in: array<f32>;
@group(0) @binding(12) var<storage, read_write> dq: array<f32>;
@group(0) @binding(13) var<storage, read_write> dkv: array<f32>;

var<workgroup> row_a: array<f32, 256>;
var<workgroup> row_b: array<f32, 256>;
var<workgroup> blk_a: array<f32, 64>;
var<workgroup> blk_b: array<f32, 64>;

// Whether query i of batch row bi sees key jj.
fn sees(bi: u32, i: u32, jj: u32) -> bool {
    let prefix = params[7];
    if (jj < prefix) { return true; }
    let j = jj - prefix;
    let pos = params[6] + i;
    if (params[8] != 0u && j > pos) { return false; }
    let w = params[9];
    if (params[12] != 0u && pos >= w && j <= pos - w) { return false; }
    let real = params[6] + params[3];
    if (params[13] != 0u) {
        if (j < u32(keep[bi * real + pos])) { return false; }
    } else if (params[10] != 0u && keep[bi * real + j] == 0.0) { return false; }
    return true;
}

// Keys a query at row i may see lie below this.
fn key_end(i: u32) -> u32 {
    if (params[8] != 0u) { return min(params[4], params[7] + params[6] + i + 1u); }
    return params[4];
}

// The kv head of query-head row bh (= batch·h + head).
fn kv_of(bh: u32) -> u32 {
    let h = params[1];
    return (bh / h) * params[2] + (bh % h) / (h / params[2]);
}

@compute @workgroup_size(64)
fn attn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = group_index(wid, nwg);
    let tq = params[3];
    let tk = params[4];
    let d = params[5];
    if (r >= params[0] * params[1] * tq) { return; }
    let bh = r / tq;
    let i = r % tq;
    let bi = bh / params[1];
    let kb = kv_of(bh) * tk * d;
    let scale = pf32(11u);
    let ninf = -f32_inf();
    for (var c = lid; c < d; c = c + 64u) { row_a[c] = q[r * d + c]; }
    workgroupBarrier();
    var m = ninf;
    var l = 0.0;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    let kend = key_end(i);
    for (var j0 = 0u; j0 < kend; j0 = j0 + 64u) {
        let jj = j0 + lid;
        var s = ninf;
        if (jj < kend && sees(bi, i, jj)) {
            var dot = 0.0;
            for (var c = 0u; c < d; c = c + 1u) { dot = dot + row_a[c] * k[kb + jj * d + c]; }
            s = dot * scale;
        }
        blk_a[lid] = s;
        workgroupBarrier();
        let n = min(64u, kend - j0);
        var bm = ninf;
        for (var t = 0u; t < n; t = t + 1u) { bm = max(bm, blk_a[t]); }
        let mn = max(m, bm);
        if (mn > ninf) {
            var corr = 0.0;
            if (m > ninf) { corr = exp(m - mn); }
            l = l * corr;
            for (var u = 0u; u < 4u; u = u + 1u) { acc[u] = acc[u] * corr; }
            for (var t = 0u; t < n; t = t + 1u) {
                let st = blk_a[t];
                if (st > ninf) {
                    let p = exp(st - mn);
                    l = l + p;
                    for (var u = 0u; u < 4u; u = u + 1u) {
                        let c = lid + 64u * u;
                        if (c < d) { acc[u] = acc[u] + p * v[kb + (j0 + t) * d + c]; }
                    }
                }
            }
            m = mn;
        }
        workgroupBarrier();
    }
    if (l == 0.0) {
        // Sees no key: the mean of every value, as the composed attention's finite bias gives.
        for (var u = 0u; u < 4u; u = u + 1u) {
            let c = lid + 64u * u;
            var sum = 0.0;
            if (c < d) {
                for (var jj = 0u; jj < tk; jj = jj + 1u) { sum = sum + v[kb + jj * d + c]; }
            }
            acc[u] = sum / f32(tk);
        }
        if (lid == 0u) { lse_out[r] = ninf; }
    } else {
        for (var u = 0u; u < 4u; u = u + 1u) { acc[u] = acc[u] / l; }
        if (lid == 0u) { lse_out[r] = m + log(l); }
    }
    for (var u = 0u; u < 4u; u = u + 1u) {
        let c = lid + 64u * u;
        if (c < d) { o_out[r * d + c] = acc[u]; }
    }
}

// stats[r] = L_r, stats[rows + r] = D_r = Σ_c dO_rc o_rc.
@compute @workgroup_size(64)
fn attn_bwd_prep(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = group_index(wid, nwg);
    let rows = params[0] * params[1] * params[3];
    let d = params[5];
    if (r >= rows) { return; }
    var s = 0.0;
    for (var c = lid; c < d; c = c + 64u) { s = s + go[r * d + c] * o_in[r * d + c]; }
    s = tree_sum(lid, s);
    if (lid == 0u) {
        stats[r] = lse_in[r];
        stats[rows + r] = s;
    }
}

// ds of query row r against key jj (0 where it does not see jj or sees nothing); row_a holds
// q_r and row_b dO_r.
fn ds_of(bi: u32, i: u32, r: u32, jj: u32, kb: u32) -> f32 {
    let rows = params[0] * params[1] * params[3];
    let lse = stats_in[r];
    if (lse == -f32_inf() || !sees(bi, i, jj)) { return 0.0; }
    let d = params[5];
    var s = 0.0;
    var dp = 0.0;
    for (var c = 0u; c < d; c = c + 1u) {
        s = s + row_a[c] * k[kb + jj * d + c];
        dp = dp + row_b[c] * v[kb + jj * d + c];
    }
    let scale = pf32(11u);
    let p = exp(s * scale - lse);
    return p * (dp - stats_in[rows + r]) * scale;
}

@compute @workgroup_size(64)
fn attn_bwd_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = group_index(wid, nwg);
    let tq = params[3];
    let tk = params[4];
    let d = params[5];
    if (r >= params[0] * params[1] * tq) { return; }
    let bh = r / tq;
    let i = r % tq;
    let bi = bh / params[1];
    let kb = kv_of(bh) * tk * d;
    for (var c = lid; c < d; c = c + 64u) {
        row_a[c] = q[r * d + c];
        row_b[c] = go[r * d + c];
    }
    workgroupBarrier();
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    let kend = key_end(i);
    for (var j0 = 0u; j0 < kend; j0 = j0 + 64u) {
        let jj = j0 + lid;
        var ds = 0.0;
        if (jj < kend) { ds = ds_of(bi, i, r, jj, kb); }
        blk_a[lid] = ds;
        workgroupBarrier();
        let n = min(64u, kend - j0);
        for (var t = 0u; t < n; t = t + 1u) {
            let dst = blk_a[t];
            if (dst == 0.0) { continue; } // a key this query cannot see (uniform, as above)
            for (var u = 0u; u < 4u; u = u + 1u) {
                let c = lid + 64u * u;
                if (c < d) { acc[u] = acc[u] + dst * k[kb + (j0 + t) * d + c]; }
            }
        }
        workgroupBarrier();
    }
    for (var u = 0u; u < 4u; u = u + 1u) {
        let c = lid + 64u * u;
        if (c < d) { dq[r * d + c] = acc[u]; }
    }
}

// One workgroup per key row (batch, kv head, jj): dkv[0..] = dK, dkv[b·hk·tk·d..] = dV.
@compute @workgroup_size(64)
fn attn_bwd_dkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let kr = group_index(wid, nwg);
    let h = params[1];
    let hk = params[2];
    let tq = params[3];
    let tk = params[4];
    let d = params[5];
    let nk = params[0] * hk * tk;
    if (kr >= nk) { return; }
    let g = kr / tk;
    let jj = kr % tk;
    let bi = g / hk;
    let rep = h / hk;
    let kb = g * tk * d;
    let rows = params[0] * h * tq;
    // The key and value in workgroup memory (row_a, row_b are the query side's in ds_of, so
    // here the dot products are written out).
    var acc_k = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var acc_v = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    // The queries i in [ilo, ihi) of each of the rep heads are visited. Without a padding mask
    // or an empty window every query sees some key (itself, at least), so only the queries
    // that can see this key need visiting; otherwise a query that sees no key at all adds the
    // uniform p to every key's dV, so all are visited.
    var ilo = 0u;
    var ihi = tq;
    let prefix = params[7];
    let offset = params[6];
    let none_empty = params[10] == 0u && !(params[12] != 0u && params[9] == 0u);
    if (none_empty && jj >= prefix) {
        let j = jj - prefix;
        // Causal: query i sees j only when j ≤ offset + i.
        if (params[8] != 0u && j > offset) { ilo = min(tq, j - offset); }
        // Window w: only when j + w > offset + i (a window wider than every position bounds
        // nothing, and j + w could overflow).
        let w = params[9];
        if (params[12] != 0u && w <= offset + tq) { ihi = min(ihi, select(0u, j + w - offset, j + w > offset)); }
        // Packed sequences: the positions whose sequence starts at or before j come first
        // (starts are nondecreasing); the first position past them ends the range.
        if (params[13] != 0u) {
            let real = offset + tq;
            var lo = 0u;
            var hi = real;
            while (lo < hi) {
                let mid = (lo + hi) / 2u;
                if (u32(keep[bi * real + mid]) > j) { hi = mid; } else { lo = mid + 1u; }
            }
            ihi = min(ihi, select(0u, lo - offset, lo > offset));
        }
    }
    let span = select(0u, ihi - ilo, ihi > ilo);
    let nq = rep * span;
    let scale = pf32(11u);
    let uniform_p = 1.0 / f32(tk);
    // Flat index u over (head of the group, query in range) → query-side row.
    let first = g * rep * tq;
    for (var u0 = 0u; u0 < nq; u0 = u0 + 64u) {
        let u = u0 + lid;
        var p = 0.0;
        var ds = 0.0;
        if (u < nq) {
            let i = ilo + u % span;
            let r = first + (u / span) * tq + i;
            let lse = stats_in[r];
            if (lse == -f32_inf()) {
                p = uniform_p;
            } else if (sees(bi, i, jj)) {
                var s = 0.0;
                var dp = 0.0;
                for (var c = 0u; c < d; c = c + 1u) {
                    s = s + q[r * d + c] * k[kb + jj * d + c];
                    dp = dp + go[r * d + c] * v[kb + jj * d + c];
                }
                p = exp(s * scale - lse);
                ds = p * (dp - stats_in[rows + r]) * scale;
            }
        }
        blk_a[lid] = p;
        blk_b[lid] = ds;
        workgroupBarrier();
        let n = min(64u, nq - u0);
        for (var t = 0u; t < n; t = t + 1u) {
            let ut = u0 + t;
            let rt = first + (ut / span) * tq + ilo + ut % span;
            let pt = blk_a[t];
            let dst = blk_b[t];
            // A query that cannot see this key adds nothing: skip its rows' reads (the same
            // value for every invocation, so the branch is uniform).
            if (pt == 0.0 && dst == 0.0) { continue; }
            for (var w = 0u; w < 4u; w = w + 1u) {
                let c = lid + 64u * w;
                if (c < d) {
                    acc_v[w] = acc_v[w] + pt * go[rt * d + c];
                    acc_k[w] = acc_k[w] + dst * q[rt * d + c];
                }
            }
        }
        workgroupBarrier();
    }
    for (var w = 0u; w < 4u; w = w + 1u) {
        let c = lid + 64u * w;
        if (c < d) {
            dkv[kr * d + c] = acc_k[w];
            dkv[nk * d + kr * d + c] = acc_v[w];
        }
    }
}
