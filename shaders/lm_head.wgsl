// Logits for one row tile of the (f16 or f32) output matrix: logits[t, row0 + r] = sum_c x[lm_t0 + t, c] * W[r, c].
// The matrix is the largest tensor of a BitNet model (657 MB in f16 for 2B-4T), so it is split into row
// tiles that each fit a storage binding; each tile is one dispatch. 2 ROWS rows per workgroup, 256/ROWS
// lanes per pair of rows; each lane unpacks eight weights of each row at a time once and applies them to
// TT tokens (the rows of a batched decode step, up to 16), reading the hidden states as vec4.

override F16: bool = true;
// Rows per workgroup (256 / ROWS lanes per row).
override ROWS: u32 = 8u;
const TT: u32 = 16u;

struct Params {
    c: u32,      // C
    rows: u32,   // rows in this tile
    row0: u32,   // first vocabulary row of this tile
    v: u32,      // V, row length of logits
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> wt: array<u32>;           // [rows, C] f16 pairs or f32 bits
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;      // [T, C] final-normed hidden states
@group(0) @binding(4) var<storage, read_write> logits: array<f32>; // [lm_t, V]

// Lane sums staged eight tokens at a time, [row][lane][9] plus 8 words of padding per row.
var<workgroup> red: array<f32, 2560>;

fn xs(e: u32) -> f32 {
    return x[e / 4u][e % 4u];
}

// Hidden state t's columns col..col+8 (col a multiple of 8 when C is; else element by element), for t past
// the last token the last token's.
fn x8(t: u32, col: u32) -> array<vec4<f32>, 2> {
    let e = (step.lm_t0 + min(t, step.lm_t - 1u)) * p.c + col;
    if e % 4u == 0u {
        return array<vec4<f32>, 2>(x[e / 4u], x[e / 4u + 1u]);
    }
    return array<vec4<f32>, 2>(
        vec4<f32>(xs(e), xs(e + 1u), xs(e + 2u), xs(e + 3u)),
        vec4<f32>(xs(e + 4u), xs(e + 5u), xs(e + 6u), xs(e + 7u)),
    );
}

// Four tokens from t against two rows' eight weights (wa, wb and wc, wd) at column col, added into ga and
// gb: each hidden-state load serves both rows.
fn head4(wa: vec4<f32>, wb: vec4<f32>, wc: vec4<f32>, wd: vec4<f32>, t: u32, col: u32, ga: ptr<function, vec4<f32>>, gb: ptr<function, vec4<f32>>) {
    let a = x8(t, col);
    let b = x8(t + 1u, col);
    let c = x8(t + 2u, col);
    let d = x8(t + 3u, col);
    *ga += vec4<f32>(
        dot(wa, a[0]) + dot(wb, a[1]),
        dot(wa, b[0]) + dot(wb, b[1]),
        dot(wa, c[0]) + dot(wb, c[1]),
        dot(wa, d[0]) + dot(wb, d[1]),
    );
    *gb += vec4<f32>(
        dot(wc, a[0]) + dot(wd, a[1]),
        dot(wc, b[0]) + dot(wd, b[1]),
        dot(wc, c[0]) + dot(wd, c[1]),
        dot(wc, d[0]) + dot(wd, d[1]),
    );
}

// Row `row`'s eight weights at word j0 (n of them; the rest zero) as two vec4: four f16 pairs, or eight
// f32. Zero for a row past the tile.
fn weights8(row: u32, j0: u32, n: u32, nw: u32) -> array<vec4<f32>, 2> {
    if row >= p.rows {
        return array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    }
    let rb = row * nw;
    if F16 {
        var wv = vec4<u32>(0u);
        if n == 4u {
            wv = vec4<u32>(wt[rb + j0], wt[rb + j0 + 1u], wt[rb + j0 + 2u], wt[rb + j0 + 3u]);
        } else {
            for (var k = 0u; k < n; k++) {
                wv[k] = wt[rb + j0 + k];
            }
        }
        return array<vec4<f32>, 2>(
            vec4<f32>(unpack2x16float(wv.x), unpack2x16float(wv.y)),
            vec4<f32>(unpack2x16float(wv.z), unpack2x16float(wv.w)),
        );
    }
    var e = array<f32, 8>();
    for (var k = 0u; k < n; k++) {
        e[k] = bitcast<f32>(wt[rb + j0 + k]);
    }
    return array<vec4<f32>, 2>(vec4<f32>(e[0], e[1], e[2], e[3]), vec4<f32>(e[4], e[5], e[6], e[7]));
}

fn lm_put(slot: u32, lo: vec4<f32>, hi: vec4<f32>) {
    red[slot] = lo.x;
    red[slot + 1u] = lo.y;
    red[slot + 2u] = lo.z;
    red[slot + 3u] = lo.w;
    red[slot + 4u] = hi.x;
    red[slot + 5u] = hi.y;
    red[slot + 6u] = hi.z;
    red[slot + 7u] = hi.w;
}

// Thread lid < 8 ROWS: row lid / 8 of the staged rows, token lid % 8 of the staged eight, summed over lanes.
fn lm_sum(lid: u32, lanes: u32, rs: u32) -> f32 {
    var v = 0.0;
    if lid < 8u * ROWS {
        let b = (lid / 8u) * rs + lid % 8u;
        for (var l = 0u; l < lanes; l++) {
            v += red[b + 9u * l];
        }
    }
    return v;
}

fn lm_out(row: u32, t: u32, v: f32) {
    if row < p.rows && t < step.lm_t {
        logits[t * p.v + p.row0 + row] = v;
    }
}

// Stages eight tokens' lane sums (lo, hi) of the workgroup's rows, sums them and writes them as tokens
// t..t+8 of rows row0 + lid / 8. Uniform control flow.
fn lm_reduce(lid: u32, lanes: u32, slot: u32, lo: vec4<f32>, hi: vec4<f32>, row0: u32, t: u32) {
    let rs = 9u * lanes + 8u;
    workgroupBarrier();
    lm_put(slot, lo, hi);
    workgroupBarrier();
    let v = lm_sum(lid, lanes, rs);
    if lid < 8u * ROWS {
        lm_out(row0 + lid / 8u, t + lid % 8u, v);
    }
}

// Each workgroup takes 2 ROWS rows: lane group r has rows r and ROWS + r of them, so every hidden-state
// load serves two rows (the loads, not the multiply-adds, bound this kernel).
@compute @workgroup_size(256)
fn lm_head(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let lanes = 256u / ROWS;
    let lane = lid % lanes;
    let r = lid / lanes;
    let base = wg.x * 2u * ROWS;
    let row = base + r;
    let row2 = base + ROWS + r;
    let t0 = wg.y * TT;
    let nt = min(TT, step.lm_t - min(step.lm_t, t0));
    // Sixteen tokens' sums of both rows in named vectors (an indexed array would sit in local memory on
    // NVIDIA).
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var b0 = vec4<f32>(0.0);
    var b1 = vec4<f32>(0.0);
    var b2 = vec4<f32>(0.0);
    var b3 = vec4<f32>(0.0);
    if row < p.rows && nt > 0u {
        // Eight weights per lane and step: four f16 pairs, or eight f32.
        let per = select(8u, 4u, F16);
        let nw = select(p.c, p.c / 2u, F16);
        for (var j0 = per * lane; j0 < nw; j0 += per * lanes) {
            let n = min(per, nw - j0);
            let wa = weights8(row, j0, n, nw);
            let wb = weights8(row2, j0, n, nw);
            // Columns past C carry zero weights; x8 may read a few values past the row, inside the
            // binding or zeroed by its bounds checks, and they meet those zeros.
            let col = select(j0, 2u * j0, F16);
            if nt == 1u {
                // Decode of one sequence: one token, not a group of four copies of it.
                let a = x8(t0, col);
                a0.x += dot(wa[0], a[0]) + dot(wa[1], a[1]);
                b0.x += dot(wb[0], a[0]) + dot(wb[1], a[1]);
                continue;
            }
            head4(wa[0], wa[1], wb[0], wb[1], t0, col, &a0, &b0);
            if nt > 4u {
                head4(wa[0], wa[1], wb[0], wb[1], t0 + 4u, col, &a1, &b1);
            }
            if nt > 8u {
                head4(wa[0], wa[1], wb[0], wb[1], t0 + 8u, col, &a2, &b2);
            }
            if nt > 12u {
                head4(wa[0], wa[1], wb[0], wb[1], t0 + 12u, col, &a3, &b3);
            }
        }
    }
    let slot = r * (9u * lanes + 8u) + 9u * lane;
    lm_reduce(lid, lanes, slot, a0, a1, base, t0);
    lm_reduce(lid, lanes, slot, b0, b1, base + ROWS, t0);
    if nt > 8u {
        lm_reduce(lid, lanes, slot, a2, a3, base, t0 + 8u);
        lm_reduce(lid, lanes, slot, b2, b3, base + ROWS, t0 + 8u);
    }
}

// lm_head_tiled: the same logits for many tokens at once (training and long scoring chunks), on the shared
// tiled GEMM (gemm_tile.wgsl, prepended): logits[lm_t, rows] = X[lm_t, C] . W[rows, C]^T, a 128-token x
// 128-row block per workgroup with C walked in slices staged in workgroup memory, so each weight is read
// once per 128 tokens (lm_head above reads it once per 16). CPU twin: cpu::lm_head.
// Grid (ceil(rows / 128), ceil(lm_t / 128)).

// A[t, k..k+4] = x[lm_t0 + t, k..k+4], zero past the chunk or the row.
fn gemm_a(t: u32, k: u32) -> vec4<f32> {
    if t >= step.lm_t {
        return vec4<f32>(0.0);
    }
    let e = (step.lm_t0 + t) * p.c + k;
    if e % 4u == 0u && k + 3u < p.c {
        return x[e / 4u];
    }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if k + i < p.c {
            v[i] = xs(e + i);
        }
    }
    return v;
}

// B[k..k+4, n] = W[n, k..k+4]: the head's rows run along k.
const GEMM_B_K: bool = true;

fn gemm_b(k: u32, n: u32) -> vec4<f32> {
    return head_row4(n, k);
}

fn gemm_store(t: u32, n: u32, v: vec4<f32>) {
    if t >= step.lm_t {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if n + j < p.rows {
            logits[t * p.v + p.row0 + n + j] = v[j];
        }
    }
}

@compute @workgroup_size(256)
fn lm_head_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    gemm_tile(wg.y * 128u, wg.x * 128u, p.c, lid3.x);
}
