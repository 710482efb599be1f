// Backward of causal GQA attention over whole sequences (training: start = 0, K/V in the cache layout
// [slots, NKV, P, HD]; a micro-batch of several sequences has one slot per sequence, `row_slot`, and no row
// attends across sequences). The softmax is recomputed, never stored: with s_j = scale q.k_j, p = softmax(s),
// dp_j = dout.v_j and D = sum_j p_j dp_j:
//   attention_backward_dq:  dq = scale * sum_j p_j (dp_j - D) k_j;  also saves (max, sum, D) per (t, h)
//                           (q may sit inside the fused qkv buffer: q_stride)
//                           grid (T, NH), the keys in blocks of 256, one thread per key in a block
//   attention_backward_dkv: dk_j = scale * sum_{t>=j, h in group} p_tj (dp_tj - D_t) q_t,
//                           dv_j = sum p_tj dout_t;  grid (T, NKV), (query, head) pairs in blocks of 256
// Each output has a single writer, so no atomics. CPU twin: cpu::attention_backward.
// (D is taken as dout . out with the forward output, as FlashAttention does; the CPU twin sums p_j dp_j.)

struct Params {
    nh: u32,
    nkv: u32,
    hd: u32,
    p: u32,        // positions the K/V buffers hold
    q_stride: u32, // columns per token of q (NH*HD, or NH*HD + 2*NKV*HD inside the fused qkv buffer)
    g_stride: u32, // columns per token of the gradient buffer dqkv
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<uniform> step: Step;
// q, k, v and dout are read as vec4 (HD and q_stride are multiples of 4): a score or dp is HD/4 16-byte
// loads, and the row every thread of a workgroup shares (q and dout in dq, k and v in dkv) is staged in
// workgroup memory once. (The first version read scalars from memory for both operands: 24% of a 2B-4T
// training step.)
@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;      // [T, q_stride], rotated q first
@group(0) @binding(3) var<storage, read> k: array<vec4<f32>>;      // [NKV, P, HD] rotated
@group(0) @binding(4) var<storage, read> v: array<vec4<f32>>;      // [NKV, P, HD]
@group(0) @binding(5) var<storage, read> dout: array<vec4<f32>>;   // [T, NH, HD]
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;  // [T, NH, 4]: max, sum, D
// The gradients go to one buffer laid out like the fused qkv projection output, [T, g_stride] with dq in
// columns [0, NH*HD), dk in [NH*HD, NH*HD + NKV*HD) and dv after it: the ternary backward of the fused
// q|k|v tile reads it as its dy directly. (All assigned.)
@group(0) @binding(7) var<storage, read_write> dqkv: array<f32>;
@group(0) @binding(8) var<storage, read> o_fwd: array<f32>;        // [T, NH, HD] the forward output (dq only)

var<workgroup> ds_blk: array<f32, 256>;
// The shared rows (HD <= 256): q and dout of the query (dq), or k and v of the key (dkv).
var<workgroup> row_a: array<vec4<f32>, 64>;
var<workgroup> row_b: array<vec4<f32>, 64>;

fn dot_rows(x: u32, staged_a: bool) -> f32 {
    // x: vec4 offset of a row in memory; the other operand is the staged row_a (staged_a) or row_b. Two
    // accumulators keep two loads in flight.
    let n = prm.hd / 4u;
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var i = 0u;
    for (; i + 1u < n; i += 2u) {
        if staged_a {
            s0 += row_a[i] * k[x + i];
            s1 += row_a[i + 1u] * k[x + i + 1u];
        } else {
            s0 += row_b[i] * v[x + i];
            s1 += row_b[i + 1u] * v[x + i + 1u];
        }
    }
    if i < n {
        if staged_a {
            s0 += row_a[i] * k[x + i];
        } else {
            s0 += row_b[i] * v[x + i];
        }
    }
    let s = s0 + s1;
    return (s.x + s.y) + (s.z + s.w);
}

// dq: the score of the staged query (row_a) against key row kr ((slot * NKV + kv head) * P + position),
// and dp = dout . v with the staged dout (row_b).
fn score(kr: u32) -> f32 {
    return dot_rows(kr * prm.hd / 4u, true) * inverseSqrt(f32(prm.hd));
}

fn dprob(kr: u32) -> f32 {
    return dot_rows(kr * prm.hd / 4u, false);
}

// dkv: the score of query (t, h) against the staged key (row_a), and dp with the staged value (row_b).
fn score_k(t: u32, h: u32) -> f32 {
    let qo = (t * prm.q_stride + h * prm.hd) / 4u;
    let n = prm.hd / 4u;
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < n; i++) {
        s += q[qo + i] * row_a[i];
    }
    return ((s.x + s.y) + (s.z + s.w)) * inverseSqrt(f32(prm.hd));
}

fn dprob_k(t: u32, h: u32) -> f32 {
    let oo = (t * prm.nh + h) * prm.hd / 4u;
    let n = prm.hd / 4u;
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < n; i++) {
        s += dout[oo + i] * row_b[i];
    }
    return (s.x + s.y) + (s.z + s.w);
}

fn el(a: vec4<f32>, i: u32) -> f32 {
    return a[i % 4u];
}

@compute @workgroup_size(256)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let t = wg.x;
    let h = wg.y;
    let lid = lid3.x;
    if t >= step.t {
        return;
    }
    let kvh = h / (prm.nh / prm.nkv);
    // The keys of row t: positions 0..=row_pos(t) of its sequence's slot, from cache row kb.
    let kb = (row_slot(t) * prm.nkv + kvh) * prm.p;
    let n = row_pos(t) + 1u;
    if lid < prm.hd / 4u {
        row_a[lid] = q[(t * prm.q_stride + h * prm.hd) / 4u + lid];
        row_b[lid] = dout[(t * prm.nh + h) * prm.hd / 4u + lid];
    }
    workgroupBarrier();
    let scale = inverseSqrt(f32(prm.hd));
    // Pass 1: softmax max and sum in one sweep (online: each thread rescales its running sum when its
    // maximum grows), then combined across the workgroup.
    var mt = -3.0e38;
    var lt = 0.0;
    for (var j = lid; j < n; j += 256u) {
        let sj = score(kb + j);
        if sj > mt {
            lt = lt * exp(mt - sj);
            mt = sj;
        }
        lt += exp(sj - mt);
    }
    let m = wg_max(mt, lid);
    var l = 0.0;
    if lt > 0.0 {
        l = lt * exp(mt - m);
    }
    l = wg_sum(l, lid);
    // D = sum_j p_j dp_j = dout . out (the forward output), one dot product over the head dimension
    // instead of a sweep over the keys.
    var dd = 0.0;
    if lid < prm.hd {
        let oo = (t * prm.nh + h) * prm.hd + lid;
        dd = el(row_b[lid / 4u], lid) * o_fwd[oo];
    }
    dd = wg_sum(dd, lid);
    // Pass 3: dq, a block of 256 keys at a time through workgroup memory.
    var acc = 0.0; // thread `lid` owns dq[lid] (HD <= 256)
    for (var j0 = 0u; j0 < n; j0 += 256u) {
        let j = j0 + lid;
        var ds = 0.0;
        if j < n {
            let pj = exp(score(kb + j) - m) / l;
            ds = pj * (dprob(kb + j) - dd) * scale;
        }
        ds_blk[lid] = ds;
        workgroupBarrier();
        if lid < prm.hd {
            let cnt = min(256u, n - j0);
            for (var b = 0u; b < cnt; b++) {
                let e = (kb + j0 + b) * prm.hd + lid;
                acc += ds_blk[b] * el(k[e / 4u], e);
            }
        }
        workgroupBarrier();
    }
    if lid < prm.hd {
        dqkv[t * prm.g_stride + h * prm.hd + lid] = acc;
    }
    if lid == 0u {
        let so = (t * prm.nh + h) * 4u;
        stats[so] = m;
        stats[so + 1u] = l;
        stats[so + 2u] = dd;
    }
}

var<workgroup> p_blk: array<f32, 256>;

// One workgroup per (key j, kv head): the (query t >= j, head h in the group) pairs go 256 at a time, one
// per thread, which computes its score and dp serially over the head dimension and leaves p and ds in
// workgroup memory; then the first HD threads fold the block into dk[d] and dv[d]. Two barriers per 256
// pairs (the first version reduced every pair's two dot products across the workgroup: two barrier trees
// per pair, 13% of a 125m training step).
@compute @workgroup_size(256)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let j = wg.x;
    let kvh = wg.y;
    let lid = lid3.x;
    if j >= step.t {
        return;
    }
    let group = prm.nh / prm.nkv;
    let scale = inverseSqrt(f32(prm.hd));
    // The queries that see key j: rows j.. up to the end of j's sequence (the chunk's end for one
    // sequence).
    var end = step.t;
    if step.seq > 0u {
        end = min(step.t, (j / step.seq + 1u) * step.seq);
    }
    let kr = (row_slot(j) * prm.nkv + kvh) * prm.p + row_pos(j);
    let pairs = (end - j) * group;
    if lid < prm.hd / 4u {
        row_a[lid] = k[kr * prm.hd / 4u + lid];
        row_b[lid] = v[kr * prm.hd / 4u + lid];
    }
    workgroupBarrier();
    var dkd = 0.0;
    var dvd = 0.0;
    for (var i0 = 0u; i0 < pairs; i0 += 256u) {
        let i = i0 + lid;
        var pj = 0.0;
        var ds = 0.0;
        if i < pairs {
            let t = j + i / group;
            let h = kvh * group + i % group;
            let so = (t * prm.nh + h) * 4u;
            pj = exp(score_k(t, h) - stats[so]) / stats[so + 1u];
            ds = pj * (dprob_k(t, h) - stats[so + 2u]) * scale;
        }
        p_blk[lid] = pj;
        ds_blk[lid] = ds;
        workgroupBarrier();
        if lid < prm.hd {
            let cnt = min(256u, pairs - i0);
            for (var b = 0u; b < cnt; b++) {
                let t = j + (i0 + b) / group;
                let h = kvh * group + (i0 + b) % group;
                let qe = t * prm.q_stride + h * prm.hd + lid;
                let oe = (t * prm.nh + h) * prm.hd + lid;
                dkd += ds_blk[b] * el(q[qe / 4u], qe);
                dvd += p_blk[b] * el(dout[oe / 4u], oe);
            }
        }
        workgroupBarrier();
    }
    if lid < prm.hd {
        let kvd = prm.nkv * prm.hd;
        let go = j * prm.g_stride + prm.nh * prm.hd + kvh * prm.hd + lid;
        dqkv[go] = dkd;
        dqkv[go + kvd] = dvd;
    }
}
