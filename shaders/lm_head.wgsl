// Logits for one row tile of the (f16 or f32) output matrix: logits[t, row0 + r] = sum_c x[lm_t0 + t, c] * W[r, c].
// The matrix is the largest tensor of a BitNet model (657 MB in f16 for 2B-4T), so it is split into row
// tiles that each fit a storage binding; each tile is one dispatch. Layout as in matmul_ternary: 8 rows x 32
// lanes per workgroup, each weight word reused for TT tokens.

override F16: bool = true;
// Rows per workgroup (256 / ROWS lanes per row).
override ROWS: u32 = 8u;
const TT: u32 = 4u;

struct Params {
    c: u32,      // C
    rows: u32,   // rows in this tile
    row0: u32,   // first vocabulary row of this tile
    v: u32,      // V, row length of logits
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> wt: array<u32>;           // [rows, C] f16 pairs or f32 bits
@group(0) @binding(3) var<storage, read> x: array<f32>;            // [T, C] final-normed hidden states
@group(0) @binding(4) var<storage, read_write> logits: array<f32>; // [lm_t, V]

var<workgroup> red: array<f32, 1024>;   // [TT][256]

@compute @workgroup_size(256)
fn lm_head(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let lanes = 256u / ROWS;
    let lane = lid % lanes;
    let row = wg.x * ROWS + lid / lanes;
    let t0 = wg.y * TT;
    var acc: array<f32, TT>;
    if row < p.rows {
        if F16 {
            // Four consecutive words (eight weights) per lane and step: four loads in flight.
            let half_c = p.c / 2u;
            let rb = row * half_c;
            for (var j0 = 4u * lane; j0 < half_c; j0 += 4u * lanes) {
                let n = min(4u, half_c - j0);
                var wv = vec4<u32>(0u);
                if n == 4u {
                    wv = vec4<u32>(wt[rb + j0], wt[rb + j0 + 1u], wt[rb + j0 + 2u], wt[rb + j0 + 3u]);
                } else {
                    for (var k = 0u; k < n; k++) {
                        wv[k] = wt[rb + j0 + k];
                    }
                }
                for (var tt = 0u; tt < TT; tt++) {
                    let t = t0 + tt;
                    if t < step.lm_t {
                        let xb = (step.lm_t0 + t) * p.c + 2u * j0;
                        for (var k = 0u; k < n; k++) {
                            let f = unpack2x16float(wv[k]);
                            acc[tt] += x[xb + 2u * k] * f.x + x[xb + 2u * k + 1u] * f.y;
                        }
                    }
                }
            }
        } else {
            for (var j = lane; j < p.c; j += lanes) {
                let wv = bitcast<f32>(wt[row * p.c + j]);
                for (var tt = 0u; tt < TT; tt++) {
                    let t = t0 + tt;
                    if t < step.lm_t {
                        acc[tt] += x[(step.lm_t0 + t) * p.c + j] * wv;
                    }
                }
            }
        }
    }
    let ntt = min(TT, step.lm_t - min(step.lm_t, t0));
    for (var tt = 0u; tt < ntt; tt++) {
        red[tt * 256u + lid] = acc[tt];
    }
    workgroupBarrier();
    for (var off = lanes / 2u; off > 0u; off >>= 1u) {
        if lane < off {
            for (var tt = 0u; tt < ntt; tt++) {
                red[tt * 256u + lid] += red[tt * 256u + lid + off];
            }
        }
        workgroupBarrier();
    }
    if lane == 0u && row < p.rows {
        for (var tt = 0u; tt < ntt; tt++) {
            let t = t0 + tt;
            if t < step.lm_t {
                logits[t * p.v + p.row0 + row] = red[tt * 256u + lid];
            }
        }
    }
}

// lm_head_tiled: the same logits for many tokens at once (training and long scoring chunks), as a
// register-tiled GEMM: logits[T, rows] = X[T, C] . W[rows, C]^T, a 64-token x 64-row block per workgroup
// with C walked in slices of 16 staged in workgroup memory, so each weight is read once per 64 tokens
// (lm_head above reads it once per 4). CPU twin: cpu::lm_head. Grid (ceil(rows / 64), ceil(lm_t / 64)).
const GT: u32 = 64u;
const GN: u32 = 64u;
const GK: u32 = 16u;
const GS: u32 = 65u;  // padded stride of both staged slices (their stores transpose)

var<workgroup> ga: array<f32, 1040>;  // [GK][GS]: x[lm_t0 + t0 + tt, k0 + kk]
var<workgroup> gb: array<f32, 1040>;  // [GK][GS]: W[n0 + nn, k0 + kk]

fn head_weight(r: u32, c: u32) -> f32 {
    let i = r * p.c + c;
    if F16 {
        return unpack2x16float(wt[i / 2u])[i % 2u];
    }
    return bitcast<f32>(wt[i]);
}

@compute @workgroup_size(256)
fn lm_head_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let n0 = wg.x * GN;
    let t0 = wg.y * GT;
    let tx = lid % 16u;
    let ty = lid / 16u;
    // Four rows (tokens) of four columns each, in named vectors: an indexed array here would live in
    // local memory on NVIDIA (naga's bounds checks keep the driver from promoting it; measured 10x slower).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.c; k0 += GK) {
        for (var j = 0u; j < 4u; j++) {
            let e = lid + 256u * j;
            let kk = e % GK;
            let rr = e / GK;
            let k = k0 + kk;
            let t = t0 + rr;
            var xv = 0.0;
            if t < step.lm_t && k < p.c {
                xv = x[(step.lm_t0 + t) * p.c + k];
            }
            ga[kk * GS + rr] = xv;
            let n = n0 + rr;
            var wv = 0.0;
            if n < p.rows && k < p.c {
                wv = head_weight(n, k);
            }
            gb[kk * GS + rr] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < GK; kk++) {
            let ab = kk * GS + 4u * ty;
            let bb = kk * GS + tx;
            let b = vec4<f32>(gb[bb], gb[bb + 16u], gb[bb + 32u], gb[bb + 48u]);
            acc0 += ga[ab] * b;
            acc1 += ga[ab + 1u] * b;
            acc2 += ga[ab + 2u] * b;
            acc3 += ga[ab + 3u] * b;
        }
        workgroupBarrier();
    }
    store_logits(t0 + 4u * ty, n0 + tx, acc0);
    store_logits(t0 + 4u * ty + 1u, n0 + tx, acc1);
    store_logits(t0 + 4u * ty + 2u, n0 + tx, acc2);
    store_logits(t0 + 4u * ty + 3u, n0 + tx, acc3);
}

fn store_logits(t: u32, n: u32, v: vec4<f32>) {
    if t >= step.lm_t {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if n + 16u * j < p.rows {
            logits[t * p.v + p.row0 + n + 16u * j] = v[j];
        }
    }
}
