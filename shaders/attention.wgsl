// Causal grouped-query attention against the KV cache, for prefill (T queries) and decode (T = 1) alike.
// Workgroup (head, t): query t of the chunk at position start+t attends to positions 0..=start+t of kv head
// head / (NH/NKV). Keys are visited in blocks of 256 with an online softmax (running max and sum, output
// rescaled per block), so no score buffer grows with the context and any context length works.
// The cache holds `slot`s of NKV x P positions (continuous batching): `attention` reads the chunk's
// sequence at step.slot; `attention_rows` takes each query row's own (slot, position) from `rows` (a decode
// step of a batch, every row a different sequence).

struct Params {
    nh: u32,
    nkv: u32,
    hd: u32,
    stride: u32,   // row length of qkv
    cap: u32,      // positions the cache holds
    scale: f32,    // HD^-0.5
    _a: u32,
    _b: u32,
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;          // [T, stride], q in the first NH*HD
@group(0) @binding(3) var<storage, read> kc: array<vec4<f32>>;     // [NKV, P, HD/4]
@group(0) @binding(4) var<storage, read> vc: array<f32>;           // [NKV, P, HD]
@group(0) @binding(5) var<storage, read_write> out: array<f32>;    // [T, NH*HD]
@group(0) @binding(11) var<storage, read> rows: array<vec2<u32>>;  // [T] (slot, position): attention_rows only

var<workgroup> qs: array<vec4<f32>, 64>;
var<workgroup> pr: array<f32, 256>;

@compute @workgroup_size(256)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, ln: Lane) {
    let t = wg.y;
    if t >= step.t {
        return;
    }
    attend(wg.x, t, row_slot(t), row_pos(t) + 1u, lane_index(ln));
}

@compute @workgroup_size(256)
fn attention_rows(@builtin(workgroup_id) wg: vec3<u32>, ln: Lane) {
    let t = wg.y;
    if t >= step.t {
        return;
    }
    attend(wg.x, t, rows[t].x, rows[t].y + 1u, lane_index(ln));
}

// Query head `h` of chunk row `t` over the first `n` positions of cache slot `slot`. Called in uniform
// control flow (t and the slot are the workgroup's). Its block max and sum are reduce_max / reduce_sum,
// with subgroup operations where the device has them (attention.wgsl is compiled with reduce.wgsl or
// reduce_subgroup.wgsl, as rmsnorm_quant is): two barriers per block of 256 keys instead of eighteen, in
// what is most of a long prompt's time. `lid` is lane_index's numbering of the threads.
fn attend(h: u32, t: u32, slot: u32, n: u32, lid: u32) {
    // The cache row of this head's KV head in this slot.
    let kvh = slot * p.nkv + h / (p.nh / p.nkv);
    let hd4 = p.hd / 4u;
    if lid < hd4 {
        let qb = t * p.stride + h * p.hd + 4u * lid;
        qs[lid] = vec4<f32>(qkv[qb], qkv[qb + 1u], qkv[qb + 2u], qkv[qb + 3u]);
    }
    workgroupBarrier();
    // For the weighted sum of values, thread (g, d) handles head dim d for keys g, g+G, ... of a block:
    // all 256 threads work even when HD < 256, and each keeps four independent accumulators so that
    // several value loads are in flight at once.
    let groups = 256u / p.hd;
    let g = lid / p.hd;
    let d = lid % p.hd;
    var m = -3.0e38;
    var l = 0.0;
    var o = 0.0;   // output element `lid` (lid < HD), combined over the groups
    for (var b = 0u; b < n; b += 256u) {
        let j = b + lid;
        var sc = -3.0e38;
        if j < n {
            // 16-byte loads: a thread reads its key row as HD/4 vectors.
            let kb = (kvh * p.cap + j) * hd4;
            // Two independent accumulators keep two loads in flight per thread.
            var d0 = vec4<f32>(0.0);
            var d1 = vec4<f32>(0.0);
            var i = 0u;
            for (; i + 1u < hd4; i += 2u) {
                d0 += qs[i] * kc[kb + i];
                d1 += qs[i + 1u] * kc[kb + i + 1u];
            }
            if i < hd4 {
                d0 += qs[i] * kc[kb + i];
            }
            let dot4 = d0 + d1;
            sc = (dot4.x + dot4.y + dot4.z + dot4.w) * p.scale;
        }
        let bm = reduce_max(sc, lid);
        let nm = max(m, bm);
        var e = 0.0;
        if j < n {
            e = exp(sc - nm);
        }
        pr[lid] = e;
        let bl = reduce_sum(e, lid);
        let f = exp(m - nm);
        l = l * f + bl;
        let cnt = min(256u, n - b);
        var a0 = 0.0;
        var a1 = 0.0;
        var a2 = 0.0;
        var a3 = 0.0;
        let vb = (kvh * p.cap + b) * p.hd + d;
        var jj = g;
        let step4 = 4u * groups;
        for (; jj + 3u * groups < cnt; jj += step4) {
            a0 += pr[jj] * vc[vb + jj * p.hd];
            a1 += pr[jj + groups] * vc[vb + (jj + groups) * p.hd];
            a2 += pr[jj + 2u * groups] * vc[vb + (jj + 2u * groups) * p.hd];
            a3 += pr[jj + 3u * groups] * vc[vb + (jj + 3u * groups) * p.hd];
        }
        for (; jj < cnt; jj += groups) {
            a0 += pr[jj] * vc[vb + jj * p.hd];
        }
        wg_f32[lid] = (a0 + a1) + (a2 + a3);
        workgroupBarrier();
        if lid < p.hd {
            var acc = 0.0;
            for (var gg = 0u; gg < groups; gg++) {
                acc += wg_f32[gg * p.hd + lid];
            }
            o = o * f + acc;
        }
        m = nm;
        workgroupBarrier();
    }
    if lid < p.hd {
        out[t * p.nh * p.hd + h * p.hd + lid] = o / l;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Decode (T = 1) split over the keys ("flash decoding"): at batch 1 the kernel above has only NH
// workgroups, each walking every key. attention_split_rope gives each workgroup SPLIT keys of one head
// and writes a partial result (unnormalised output, running max, sum); attention_merge combines them per
// head. Two dispatches instead of one, but every workgroup's chain of dependent loads is short.

const SPLIT: u32 = 32u;

@group(0) @binding(6) var<storage, read_write> part: array<f32>;   // [NH, nsplit, HD + 2]
// attention_split_rope only: the rope kernel folded in (see below).
@group(0) @binding(7) var<storage, read> cos_t: array<f32>;        // [P, HD/2]
@group(0) @binding(8) var<storage, read> sin_t: array<f32>;        // [P, HD/2]
// The caches, writable: a buffer may not be bound read-only and writable in one dispatch, so this entry
// reads and writes them only through these.
@group(0) @binding(9) var<storage, read_write> kcw: array<vec4<f32>>;  // [NKV, P, HD/4]
@group(0) @binding(10) var<storage, read_write> vcw: array<f32>;       // [NKV, P, HD]

var<workgroup> sc_s: array<f32, 32>;
var<workgroup> qf: array<f32, 256>;
var<workgroup> kcur: array<vec4<f32>, 64>;
var<workgroup> vcur: array<f32, 256>;

// One element of the rotated head vector starting at `base` of the qkv row, at position `pos`.
fn rotated(base: u32, i: u32, pos: u32) -> f32 {
    let half = p.hd / 2u;
    let j = i % half;
    let c = cos_t[pos * half + j];
    let sn = sin_t[pos * half + j];
    let x1 = qkv[base + j];
    let x2 = qkv[base + half + j];
    return select(x2 * c + x1 * sn, x1 * c - x2 * sn, i < half);
}

// Decode attention with RoPE folded in, so a decode layer needs no rope dispatch. Each workgroup rotates
// its query itself; the current position's key and value are taken straight from the qkv row (rotated
// here) rather than from the cache, and the workgroups of the first query head of each KV group that own
// the last chunk write them into the cache for the following steps. Later reads of those cache entries
// happen in later dispatches, so no workgroup reads what another writes in this one.
@compute @workgroup_size(256)
fn attention_split_rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let h = wg.x;
    let sidx = wg.y;
    let lid = lid3.x;
    let pos = step.start;
    let n = pos + 1u;
    let k0 = sidx * SPLIT;
    if step.t != 1u || k0 >= n {
        return;
    }
    let cnt = min(SPLIT, n - k0);
    let nsplit = (p.cap + SPLIT - 1u) / SPLIT;
    let group = p.nh / p.nkv;
    let kvh = h / group;
    let hd4 = p.hd / 4u;
    let kbase = p.nh * p.hd + kvh * p.hd;
    let vbase = (p.nh + p.nkv) * p.hd + kvh * p.hd;
    let ch = step.slot * p.nkv + kvh;   // the KV head's cache row in this sequence's slot
    let owns_last = k0 + cnt == n;
    if lid < p.hd {
        qf[lid] = rotated(h * p.hd, lid, pos);
        if owns_last {
            vcur[lid] = qkv[vbase + lid];
        }
    }
    workgroupBarrier();
    if lid < hd4 {
        qs[lid] = vec4<f32>(qf[4u * lid], qf[4u * lid + 1u], qf[4u * lid + 2u], qf[4u * lid + 3u]);
    }
    workgroupBarrier();
    if owns_last {
        if lid < p.hd {
            qf[lid] = rotated(kbase, lid, pos);
        }
        workgroupBarrier();
        if lid < hd4 {
            kcur[lid] = vec4<f32>(qf[4u * lid], qf[4u * lid + 1u], qf[4u * lid + 2u], qf[4u * lid + 3u]);
            if h % group == 0u {
                kcw[(ch * p.cap + pos) * hd4 + lid] = kcur[lid];
            }
        }
        if h % group == 0u && lid < p.hd {
            vcw[(ch * p.cap + pos) * p.hd + lid] = vcur[lid];
        }
        workgroupBarrier();
    }
    let key = lid / 8u;
    let sub = lid % 8u;
    var d4 = vec4<f32>(0.0);
    if key < cnt {
        if k0 + key == pos {
            for (var i = sub; i < hd4; i += 8u) {
                d4 += qs[i] * kcur[i];
            }
        } else {
            let kb = (ch * p.cap + k0 + key) * hd4;
            for (var i = sub; i < hd4; i += 8u) {
                d4 += qs[i] * kcw[kb + i];
            }
        }
    }
    wg_f32[lid] = d4.x + d4.y + d4.z + d4.w;
    workgroupBarrier();
    if sub == 0u && key < SPLIT {
        var sc = -3.0e38;
        if key < cnt {
            sc = ((wg_f32[lid] + wg_f32[lid + 1u]) + (wg_f32[lid + 2u] + wg_f32[lid + 3u]) + ((wg_f32[lid + 4u] + wg_f32[lid + 5u]) + (wg_f32[lid + 6u] + wg_f32[lid + 7u]))) * p.scale;
        }
        sc_s[key] = sc;
    }
    workgroupBarrier();
    var m = -3.0e38;
    for (var j = 0u; j < cnt; j++) {
        m = max(m, sc_s[j]);
    }
    if lid < SPLIT {
        pr[lid] = select(0.0, exp(sc_s[lid] - m), lid < cnt);
    }
    workgroupBarrier();
    var l = 0.0;
    for (var j = 0u; j < cnt; j++) {
        l += pr[j];
    }
    let groups = 256u / p.hd;
    let g = lid / p.hd;
    let d = lid % p.hd;
    var acc = 0.0;
    let vb = (ch * p.cap + k0) * p.hd + d;
    // The current position's value comes from vcur; every other key's from the cache, two loads at a time.
    var acc1 = 0.0;
    var jj = g;
    for (; jj + groups < cnt; jj += 2u * groups) {
        let j2 = jj + groups;
        let v1 = select(vcw[vb + jj * p.hd], vcur[d], k0 + jj == pos);
        let v2 = select(vcw[vb + j2 * p.hd], vcur[d], k0 + j2 == pos);
        acc += pr[jj] * v1;
        acc1 += pr[j2] * v2;
    }
    if jj < cnt {
        acc += pr[jj] * select(vcw[vb + jj * p.hd], vcur[d], k0 + jj == pos);
    }
    acc += acc1;
    workgroupBarrier();
    wg_f32[lid] = acc;
    workgroupBarrier();
    let ob = (h * nsplit + sidx) * (p.hd + 2u);
    if lid < p.hd {
        var o = 0.0;
        for (var gg = 0u; gg < groups; gg++) {
            o += wg_f32[gg * p.hd + lid];
        }
        part[ob + lid] = o;
    }
    if lid == 0u {
        part[ob + p.hd] = m;
        part[ob + p.hd + 1u] = l;
    }
}

@compute @workgroup_size(256)
fn attention_merge(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let h = wg.x;
    let lid = lid3.x;
    if step.t != 1u {
        return;
    }
    let n = step.start + 1u;
    let ns = (n + SPLIT - 1u) / SPLIT;
    let nsplit = (p.cap + SPLIT - 1u) / SPLIT;
    let stride = p.hd + 2u;
    var mx = -3.0e38;
    for (var s = 0u; s < ns; s++) {
        mx = max(mx, part[(h * nsplit + s) * stride + p.hd]);
    }
    if lid < p.hd {
        var num = 0.0;
        var den = 0.0;
        for (var s = 0u; s < ns; s++) {
            let b = (h * nsplit + s) * stride;
            let f = exp(part[b + p.hd] - mx);
            num += f * part[b + lid];
            den += f * part[b + p.hd + 1u];
        }
        out[h * p.hd + lid] = num / den;
    }
}
