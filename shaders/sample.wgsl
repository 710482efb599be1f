// Picks the next token from logits [V] on the device, so decode copies back 4 bytes instead of the logits.
// Same semantics as engine/src/cpu/sample.rs, in transformers' order: repetition penalty (seen tokens, a
// bitmask), temperature, top-k, top-p, then an inverse-CDF draw with the seeded uniform `u`.
// Thresholds are found by bisection over an order-preserving u32 key of the f32 values (32 passes, no
// sort): the top-k threshold is the largest key with count(key >= K) >= k, the top-p threshold the largest
// key whose kept mass reaches p. A single workgroup; each pass is a strided sweep plus a reduction.
//
// `sample` / `sample_partial` take their settings from `step` (one sequence). `sample_rows` /
// `sample_partial_rows` pick one token per logits row, each row with its own settings and its own
// sequence's repetition set (`rowp`, continuous batching): workgroup y (partials) or x (picks) is the row.
// Both set the private `cur` and run the same code.

struct Params {
    v: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> logits: array<f32>;        // [V]
@group(0) @binding(3) var<storage, read_write> seen: array<u32>;    // [ceil(V/32)] bitmask; the pick is added
@group(0) @binding(4) var<storage, read_write> out: array<u32>;     // [1]
@group(0) @binding(5) var<storage, read_write> partial: array<vec2<u32>>; // [rows, ceil(V/CHUNK)] (value bits, index)

struct RowParams {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    penalty: f32,
    u: f32,
    slot: u32,    // the sequence's row of `seen`
    _a: u32,
    _b: u32,
}
@group(0) @binding(6) var<storage, read> rowp: array<RowParams>;    // [rows]: the *_rows entries only

// The settings and offsets of the row being sampled.
struct Cur {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    penalty: f32,
    u: f32,
    logits: u32,   // first logit of the row
    seen: u32,     // first word of the row's repetition set
    partial: u32,  // first partial of the row
    out: u32,      // index of the pick in `out`
}
var<private> cur: Cur;

fn from_step() {
    cur = Cur(step.temperature, step.top_k, step.top_p, step.penalty, step.u, 0u, 0u, 0u, 0u);
}

fn from_row(r: u32) {
    let q = rowp[r];
    let words = (p.v + 31u) / 32u;
    let np = (p.v + CHUNK - 1u) / CHUNK;
    cur = Cur(q.temperature, q.top_k, q.top_p, q.penalty, q.u, r * p.v, q.slot * words, r * np, r);
}

const CHUNK: u32 = 4096u;

var<workgroup> redf: array<f32, 256>;
var<workgroup> redu: array<u32, 256>;
var<workgroup> redi: array<u32, 256>;

fn value(i: u32) -> f32 {
    var l = logits[cur.logits + i];
    if cur.penalty != 1.0 && ((seen[cur.seen + i / 32u] >> (i % 32u)) & 1u) == 1u {
        l = select(l * cur.penalty, l / cur.penalty, l > 0.0);
    }
    return l;
}

// Workgroup argmax of (value, index) pairs into redf[0] / redi[0]: the larger value wins, ties go to the
// smaller index (torch.argmax's first maximum); index 0xffffffff marks "none".
fn argmax_reduce(best: f32, bi: u32, lid: u32) {
    redf[lid] = best;
    redi[lid] = bi;
    workgroupBarrier();
    for (var off = 128u; off > 0u; off >>= 1u) {
        if lid < off {
            let ob = redf[lid + off];
            let oi = redi[lid + off];
            if oi != 0xffffffffu && (redi[lid] == 0xffffffffu || ob > redf[lid] || (ob == redf[lid] && oi < redi[lid])) {
                redf[lid] = ob;
                redi[lid] = oi;
            }
        }
        workgroupBarrier();
    }
}

fn key(f: f32) -> u32 {
    let b = bitcast<u32>(f);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn sum_u(v: u32, lid: u32) -> u32 {
    redu[lid] = v;
    workgroupBarrier();
    for (var off = 128u; off > 0u; off >>= 1u) {
        if lid < off {
            redu[lid] += redu[lid + off];
        }
        workgroupBarrier();
    }
    let r = redu[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn sample(@builtin(local_invocation_id) lid3: vec3<u32>) {
    from_step();
    pick(lid3.x);
}

@compute @workgroup_size(256)
fn sample_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    if wg.x >= step.lm_t {
        return;
    }
    from_row(wg.x);
    pick(lid3.x);
}

fn mark(i: u32) {
    out[cur.out] = i;
    seen[cur.seen + i / 32u] |= 1u << (i % 32u);
}

fn pick(lid: u32) {
    let v = p.v;
    if cur.temperature <= 0.0 {
        // Greedy: first index of the maximum, as torch.argmax.
        // Greedy: sample_partial left the first maximum of each CHUNK-logit chunk; reduce those.
        var best = -3.4e38;
        var bi = 0xffffffffu;
        let np = (v + CHUNK - 1u) / CHUNK;
        for (var j = lid; j < np; j += 256u) {
            let e = partial[cur.partial + j];
            let x = bitcast<f32>(e.x);
            if x > best || bi == 0xffffffffu {
                best = x;
                bi = e.y;
            }
        }
        argmax_reduce(best, bi, lid);
        if lid == 0u {
            mark(redi[0]);
        }
        return;
    }
    let inv_t = cur.temperature;
    var m = -3.4e38;
    for (var i = lid; i < v; i += 256u) {
        m = max(m, value(i) / inv_t);
    }
    let mx = wg_max(m, lid);
    // top-k threshold
    var kk = 0u;
    if cur.top_k > 0u && cur.top_k < v {
        for (var b = 31i; b >= 0i; b--) {
            let cand = kk | (1u << u32(b));
            var cnt = 0u;
            for (var i = lid; i < v; i += 256u) {
                cnt += select(0u, 1u, key(value(i) / inv_t) >= cand);
            }
            if sum_u(cnt, lid) >= cur.top_k {
                kk = cand;
            }
        }
    }
    // top-p threshold
    var thr = kk;
    if cur.top_p < 1.0 {
        var z = 0.0;
        for (var i = lid; i < v; i += 256u) {
            let x = value(i) / inv_t;
            if key(x) >= kk {
                z += exp(x - mx);
            }
        }
        let goal = cur.top_p * wg_sum(z, lid);
        var kp = 0u;
        for (var b = 31i; b >= 0i; b--) {
            let cand = kp | (1u << u32(b));
            let lim = max(cand, kk);
            var mass = 0.0;
            for (var i = lid; i < v; i += 256u) {
                let x = value(i) / inv_t;
                if key(x) >= lim {
                    mass += exp(x - mx);
                }
            }
            if wg_sum(mass, lid) >= goal {
                kp = cand;
            }
        }
        thr = max(kp, kk);
    }
    // Inverse CDF in id order: each thread owns a contiguous block; prefix sums over blocks find the block.
    let blk = (v + 255u) / 256u;
    let lo = lid * blk;
    let hi = min(lo + blk, v);
    var part = 0.0;
    var last = 0xffffffffu;
    for (var i = lo; i < hi; i++) {
        let x = value(i) / inv_t;
        if key(x) >= thr {
            part += exp(x - mx);
            last = i;
        }
    }
    redf[lid] = part;
    redi[lid] = last;
    workgroupBarrier();
    if lid == 0u {
        var total = 0.0;
        for (var j = 0u; j < 256u; j++) {
            total += redf[j];
        }
        let goal = cur.u * total;
        var acc = 0.0;
        var pick = 0xffffffffu;
        var fallback = 0u;
        for (var j = 0u; j < 256u && pick == 0xffffffffu; j++) {
            if redi[j] != 0xffffffffu {
                fallback = redi[j];
            }
            if acc + redf[j] > goal && redf[j] > 0.0 {
                let lo2 = j * blk;
                let hi2 = min(lo2 + blk, v);
                for (var i = lo2; i < hi2; i++) {
                    let x = value(i) / inv_t;
                    if key(x) >= thr {
                        acc += exp(x - mx);
                        if acc > goal {
                            pick = i;
                            break;
                        }
                    }
                }
                if pick == 0xffffffffu {
                    pick = redi[j];
                }
            } else {
                acc += redf[j];
            }
        }
        if pick == 0xffffffffu {
            pick = fallback;
        }
        mark(pick);
    }
}

// Greedy decoding, first half: the first maximum of each chunk of CHUNK logits, over many workgroups (a
// single workgroup walking 128k logits is bound by the latency of its serial loads).
@compute @workgroup_size(256)
fn sample_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    from_step();
    partial_max(wg.x, lid3.x);
}

@compute @workgroup_size(256)
fn sample_partial_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    if wg.y >= step.lm_t {
        return;
    }
    from_row(wg.y);
    partial_max(wg.x, lid3.x);
}

// The first maximum of chunk `c` of the current row's logits.
fn partial_max(c: u32, lid: u32) {
    let v = p.v;
    if cur.temperature > 0.0 {
        return;
    }
    let lo = c * CHUNK;
    let hi = min(lo + CHUNK, v);
    var best = -3.4e38;
    var bi = 0xffffffffu;
    // Four neighbouring logits per step, loaded before they are compared; indices rise within a
    // thread, so `>` keeps the first maximum.
    for (var i0 = lo + 4u * lid; i0 < hi; i0 += 1024u) {
        let n = min(4u, hi - i0);
        var xs = vec4<f32>(-3.4e38);
        for (var k = 0u; k < n; k++) {
            xs[k] = value(i0 + k);
        }
        for (var k = 0u; k < n; k++) {
            if xs[k] > best || bi == 0xffffffffu {
                best = xs[k];
                bi = i0 + k;
            }
        }
    }
    argmax_reduce(best, bi, lid);
    if lid == 0u {
        partial[cur.partial + c] = vec2<u32>(bitcast<u32>(redf[0]), redi[0]);
    }
}
