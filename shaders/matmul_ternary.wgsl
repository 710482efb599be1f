// Ternary projection of int8-quantized activations, for one row tile of the weight:
//   y[t, y_off + r] (=|+=) (sum_i T[r, i] * q[t, i]) * scale[r] / s[t]
// Weights stay packed at 2 bits (16 per u32, layout in engine/src/ternary.rs): `(word >> 2s) & 0x03030303`
// gives four codes (T+1) that line up with activation word 4w+s, so one dot4I8Packed does four
// multiply-adds; the +1 offset is removed with qsum[t] = sum_i q[t, i]. Integer sums are exact, so the GPU
// result equals the CPU reference bit for bit up to the final float scaling.
//
// MODE 0 stores, MODE 1 adds into y (the residual stream: saves a separate residual-add kernel), MODES 2
// and 3 are the fused gate/up of the MLP: the tile holds `rows` gate rows followed by the `rows` matching
// up rows and writes act(gate) * up, act = relu^2 in MODE 2 (the 2B-4T family), silu in MODE 3 (1bitLLM).
//
// A workgroup is 8 rows x ML lanes; lanes stride over the words of a row so reads are coalesced, and each
// weight word is reused for TT tokens: the rows of a batched decode step (one per sequence, up to 16 by
// default) or a prompt chunk. The word's four codes are unpacked once and serve every token, and the
// activations are read as vec4 (the four words that line up with one weight word) in one load. Fewer
// lanes per row would let the rows sharing a warp share activation loads, but measured slower on an H200
// (fewer loads in flight per row); `ML` stays a tuning knob (`BITNODE_MT_LANES`).

override MODE: u32 = 0u;

// The gate's activation of the fused gate/up (MODE 2: relu(g)^2, MODE 3: silu(g) = g sigmoid(g)); CPU
// twins cpu::relu2_mul and cpu::silu_mul compute the same products.
fn gate_act(g: f32) -> f32 {
    if MODE == 3u {
        return g * sigmoid(g);
    }
    let r = max(g, 0.0);
    return r * r;
}
// Lanes per row: 8, 16 or 32 (the workgroup is 8 ML threads).
override ML: u32 = 32u;
const TT: u32 = 16u;
// The lane sums are reduced eight tokens at a time through `red`, laid out [row][lane][9] with a row
// stride RS = 9 ML rounded up to 8 mod 32: both the stores (a row's lanes) and the sums (rows x 8 tokens
// read a lane's slot together) then touch different banks.
override RS: u32 = 9u * ML + (40u - (9u * ML) % 32u) % 32u;

struct Params {
    words: u32,     // I / 16
    rows: u32,      // output rows in this tile
    y_off: u32,     // column of y that tile row 0 writes
    y_stride: u32,  // row length of y
    eps: f32,       // rmsnorm_matmul_ternary only
    _a: u32,
    _b: u32,
    _c: u32,
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> w: array<u32>;          // [rows (x2 in MODE 2), I/16]
@group(0) @binding(3) var<storage, read> scale: array<f32>;      // [rows (x2 in MODE 2)]
@group(0) @binding(4) var<storage, read> q: array<vec4<u32>>;    // [T, I/16] packed int8, 16 per vec4
@group(0) @binding(5) var<storage, read> s: array<f32>;          // [T]
@group(0) @binding(6) var<storage, read> qsum: array<i32>;       // [T]
@group(0) @binding(7) var<storage, read_write> y: array<f32>;    // [T, y_stride]

var<workgroup> red: array<i32, 2368>;   // [8 rows][RS], RS at most 296

// The sum over a row's ML lanes of the eight values staged in `red`, for thread lid < 64: row lid / 8 of
// the workgroup, token lid % 8 of the staged eight.
fn red_sum(lid: u32) -> i32 {
    var v = 0;
    if lid < 64u {
        let b = (lid / 8u) * RS + lid % 8u;
        for (var l = 0u; l < ML; l++) {
            v += red[b + 9u * l];
        }
    }
    return v;
}

fn ternary_dot(c: vec4<u32>, x: vec4<u32>) -> i32 {
    return (dot4I8Packed(c.x, x.x) + dot4I8Packed(c.y, x.y)) + (dot4I8Packed(c.z, x.z) + dot4I8Packed(c.w, x.w));
}

// Writes output (row, t) from a reduced sum g (and u, MODE 2).
fn mt_out(row: u32, t: u32, g: i32, u: i32) {
    if row >= p.rows || t >= step.t {
        return;
    }
    let dst = t * p.y_stride + p.y_off + row;
    let a = f32(g - qsum[t]) * scale[row] / s[t];
    if MODE == 0u {
        y[dst] = a;
    } else if MODE == 1u {
        y[dst] += a;
    } else {
        let b = f32(u - qsum[t]) * scale[p.rows + row] / s[t];
        y[dst] = gate_act(a) * b;
    }
}

// Token t's activation word of input word i, for t past the last token the last token's (a uniform load
// instead of a branch per token; its sums are never written).
fn qx(t: u32, i: u32) -> vec4<u32> {
    return q[min(t, step.t - 1u) * p.words + i];
}

// Four tokens from t: their dot products with codes c (and cu, MODE 2) added into g (and u).
fn dot4t(c: vec4<u32>, cu: vec4<u32>, t: u32, i: u32, g: ptr<function, vec4<i32>>, u: ptr<function, vec4<i32>>) {
    let x0 = qx(t, i);
    let x1 = qx(t + 1u, i);
    let x2 = qx(t + 2u, i);
    let x3 = qx(t + 3u, i);
    *g += vec4<i32>(ternary_dot(c, x0), ternary_dot(c, x1), ternary_dot(c, x2), ternary_dot(c, x3));
    if MODE >= 2u {
        *u += vec4<i32>(ternary_dot(cu, x0), ternary_dot(cu, x1), ternary_dot(cu, x2), ternary_dot(cu, x3));
    }
}

fn red_put(slot: u32, lo: vec4<i32>, hi: vec4<i32>) {
    red[slot] = lo.x;
    red[slot + 1u] = lo.y;
    red[slot + 2u] = lo.z;
    red[slot + 3u] = lo.w;
    red[slot + 4u] = hi.x;
    red[slot + 5u] = hi.y;
    red[slot + 6u] = hi.z;
    red[slot + 7u] = hi.w;
}

@compute @workgroup_size(8u * ML)
fn matmul_ternary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let lane = lid % ML;
    let r = lid / ML;
    let row = wg.x * 8u + r;
    let t0 = wg.y * TT;
    // Tokens in this tile; uniform, so the groups of four past it are skipped without divergence.
    let nt = min(TT, step.t - min(step.t, t0));
    // Sixteen tokens' sums in named vectors (an indexed array would sit in local memory on NVIDIA).
    var g0 = vec4<i32>(0);
    var g1 = vec4<i32>(0);
    var g2 = vec4<i32>(0);
    var g3 = vec4<i32>(0);
    var u0 = vec4<i32>(0);
    var u1 = vec4<i32>(0);
    var u2 = vec4<i32>(0);
    var u3 = vec4<i32>(0);
    if row < p.rows && nt > 0u {
        for (var i = lane; i < p.words; i += ML) {
            let c = (vec4<u32>(w[row * p.words + i]) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(0x03030303u);
            var cu = vec4<u32>(0u);
            if MODE >= 2u {
                cu = (vec4<u32>(w[(p.rows + row) * p.words + i]) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(0x03030303u);
            }
            dot4t(c, cu, t0, i, &g0, &u0);
            if nt > 4u {
                dot4t(c, cu, t0 + 4u, i, &g1, &u1);
            }
            if nt > 8u {
                dot4t(c, cu, t0 + 8u, i, &g2, &u2);
            }
            if nt > 12u {
                dot4t(c, cu, t0 + 12u, i, &g3, &u3);
            }
        }
    }
    // Tokens 0..8 of the tile, then 8..16 when the tile has them.
    let slot = r * RS + 9u * lane;
    let orow = wg.x * 8u + lid / 8u;
    red_put(slot, g0, g1);
    workgroupBarrier();
    let s0 = red_sum(lid);
    workgroupBarrier();
    var v0 = 0;
    if MODE >= 2u {
        red_put(slot, u0, u1);
        workgroupBarrier();
        v0 = red_sum(lid);
        workgroupBarrier();
    }
    if lid < 64u {
        mt_out(orow, t0 + lid % 8u, s0, v0);
    }
    if nt > 8u {
        red_put(slot, g2, g3);
        workgroupBarrier();
        let s1 = red_sum(lid);
        var v1 = 0;
        if MODE >= 2u {
            workgroupBarrier();
            red_put(slot, u2, u3);
            workgroupBarrier();
            v1 = red_sum(lid);
        }
        if lid < 64u {
            mt_out(orow, t0 + 8u + lid % 8u, s1, v1);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// rmsnorm_matmul_ternary: the decode-step fusion of rmsnorm_quant.wgsl and matmul_ternary above (one token,
// or one per sequence of a batch, taken in turn).
// Every workgroup normalises and quantizes the whole input row itself (a few KiB, served from cache) into
// workgroup memory, then runs its rows. That duplicates a little arithmetic but removes one dispatch, and
// the GPU-wide wait that comes with it, from each of the four projections of a layer: at batch 1 the
// waits, not the arithmetic, bound decode speed. The reductions are the same code, in the same order, as
// rmsnorm_quant.wgsl, so the fused and unfused paths give identical bits. Inputs up to 8192 wide.
// Its reductions (reduce_sum, reduce_max, lanes_sum3) come from reduce.wgsl, or on adapters with
// subgroups from reduce_subgroup.wgsl, which passes 3 workgroup barriers per token instead of ~24.

@group(0) @binding(8) var<storage, read> xin: array<f32>;      // [T, I] the unnormalised input rows
@group(0) @binding(9) var<storage, read> nw: array<f32>;       // [I] RMSNorm weight

var<workgroup> xq_s: array<u32, 2048>;   // [I/4] packed int8 activations

// Rows per workgroup of the fused kernel (256 / ROWS lanes per row). More rows per workgroup spread the
// per-workgroup normalisation over more outputs; fewer give more workgroups to hide latency.
override ROWS: u32 = 8u;

@compute @workgroup_size(256)
fn rmsnorm_matmul_ternary(@builtin(workgroup_id) wg: vec3<u32>, ln: Lane) {
    let lid = lane_index(ln);
    if step.t == 0u {
        return;
    }
    let lanes = 256u / ROWS;
    let lane = lid % lanes;
    let row = wg.x * ROWS + lid / lanes;
    let c = p.words * 16u;
    // One token after another (a batch decode step has one per sequence): the workgroup's weight rows
    // stay in cache across the tokens, so the weights are read from memory once per step.
    for (var t = 0u; t < step.t; t++) {
        let xb = t * c;
        // RMSNorm statistics, exactly as rmsnorm_quant.wgsl: four neighbouring elements per step so that
        // each thread has four loads in flight.
        var acc2 = 0.0;
        for (var j = lid; j < c / 4u; j += 256u) {
            let b = 4u * j;
            let v0 = xin[xb + b];
            let v1 = xin[xb + b + 1u];
            let v2 = xin[xb + b + 2u];
            let v3 = xin[xb + b + 3u];
            acc2 += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
        }
        let ms = reduce_sum(acc2, lid) / f32(c);
        let r = 1.0 / sqrt(ms + p.eps);
        var m = 0.0;
        for (var j = lid; j < c / 4u; j += 256u) {
            let b = 4u * j;
            let y0 = abs(nw[b] * (xin[xb + b] * r));
            let y1 = abs(nw[b + 1u] * (xin[xb + b + 1u] * r));
            let y2 = abs(nw[b + 2u] * (xin[xb + b + 2u] * r));
            let y3 = abs(nw[b + 3u] * (xin[xb + b + 3u] * r));
            m = max(m, max(max(y0, y1), max(y2, y3)));
        }
        let sx = 127.0 / max(reduce_max(m, lid), 1e-5);
        for (var j = lid; j < c / 4u; j += 256u) {
            var word = 0u;
            for (var k = 0u; k < 4u; k++) {
                let i = 4u * j + k;
                let v = i32(clamp(round(nw[i] * (xin[xb + i] * r) * sx), -128.0, 127.0));
                word |= (u32(v) & 0xffu) << (8u * k);
            }
            xq_s[j] = word;
        }
        workgroupBarrier();
        // The projection, as matmul_ternary with one token.
        var a = 0;
        var au = 0;
        // The sum of the row's int8 activations (to undo the +1 code offset) is gathered here too: the
        // lanes of a row cover every word once, so their partial sums add up to it, and the lane reduction
        // below carries it at no extra barrier.
        var qsl = 0;
        if row < p.rows {
            // Each lane takes four consecutive words per step: four independent loads in flight, and the
            // 32 lanes of a row still read one contiguous 512-byte span.
            let base = row * p.words;
            let baseu = (p.rows + row) * p.words;
            for (var i0 = 4u * lane; i0 < p.words; i0 += 4u * lanes) {
                let n = min(4u, p.words - i0);
                var wv = vec4<u32>(0u);
                var wu = vec4<u32>(0u);
                if n == 4u {
                    wv = vec4<u32>(w[base + i0], w[base + i0 + 1u], w[base + i0 + 2u], w[base + i0 + 3u]);
                    if MODE >= 2u {
                        wu = vec4<u32>(w[baseu + i0], w[baseu + i0 + 1u], w[baseu + i0 + 2u], w[baseu + i0 + 3u]);
                    }
                } else {
                    for (var k = 0u; k < n; k++) {
                        wv[k] = w[base + i0 + k];
                        if MODE >= 2u {
                            wu[k] = w[baseu + i0 + k];
                        }
                    }
                }
                for (var k = 0u; k < n; k++) {
                    let i = i0 + k;
                    for (var sh = 0u; sh < 4u; sh++) {
                        let xq = xq_s[4u * i + sh];
                        qsl += dot4I8Packed(0x01010101u, xq);
                        a += dot4I8Packed((wv[k] >> (2u * sh)) & 0x03030303u, xq);
                        if MODE >= 2u {
                            au += dot4I8Packed((wu[k] >> (2u * sh)) & 0x03030303u, xq);
                        }
                    }
                }
            }
        }
        // The row's gate, up and activation sums over its lanes.
        let sums = lanes_sum3(vec3<i32>(a, au, qsl), lid, lanes);
        let qs = sums.z;
        if lane == 0u && row < p.rows {
            let dst = t * p.y_stride + p.y_off + row;
            let g = f32(sums.x - qs) * scale[row] / sx;
            if MODE == 0u {
                y[dst] = g;
            } else if MODE == 1u {
                y[dst] += g;
            } else {
                let u = f32(sums.y - qs) * scale[p.rows + row] / sx;
                y[dst] = gate_act(g) * u;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// matmul_ternary_tiled: the same projection for many tokens at once (prompt chunks, training), as a
// register-tiled integer GEMM. A workgroup computes 128 tokens x 128 weight rows; each of its 16 x 16
// threads holds 8 tokens x 8 rows of sums (64 dot4I8Packed per step of the input). The input is walked
// four weight words (64 columns) at a time: the weight words are unpacked into their four code words once,
// when staged in workgroup memory, and both codes and int8 activations are read back as vec4 (a thread's
// rows are 4tx..4tx+3 and 64+4tx..64+4tx+3, its tokens likewise from 4ty), so every 64 dot products take
// four 16-byte loads from workgroup memory and no unpacking. (The first version, 64 x 64 tiles with 4 x 4
// sums per thread, read eight scalars and unpacked four words per 16 dot products: bound by the loads.)
// MODE 0 stores, MODE 1 adds, MODE 2 is the fused gate/up: a workgroup takes 64 gate rows and the 64
// matching up rows, so each thread holds gate and up sums of the same outputs and writes relu(g)^2 * u.
// The integer sums and the final scaling are those of matmul_ternary, so both kernels give identical
// bits. CPU twin: cpu::matmul_ternary. Grid (ceil(rows / 128), ceil(T / 128)); MODE 2 (ceil(rows / 64), ..).

const KS: u32 = 16u;    // code / activation words per step of the input (four weight words)
// Tokens per workgroup: 128, or 64 for prompt chunks (a 512-token chunk of the 2560-row o projection
// makes 80 workgroups of 128 x 128, too few to fill a large GPU; measured slower than matmul_ternary).
// With 64 the threads' second token group (and its sums) drops out at pipeline creation.
override TM: u32 = 128u;
const CS: u32 = 33u;    // vec4 stride of one code or activation word's row in workgroup memory (32 + pad)

var<workgroup> tc_s: array<vec4<u32>, 528>;   // [KS][CS] codes: word k of local rows 4c..4c+3
var<workgroup> ta_s: array<vec4<u32>, 528>;   // [KS][CS] activations: word k of local tokens 4c..4c+3

fn mt_row4(c: vec4<u32>, a: u32) -> vec4<i32> {
    return vec4<i32>(dot4I8Packed(c.x, a), dot4I8Packed(c.y, a), dot4I8Packed(c.z, a), dot4I8Packed(c.w, a));
}

// Output (token t, local row group values v for rows row..row+3; MODE 2: gate g, up u).
fn mt_store4(t: u32, row: u32, g: vec4<i32>, u: vec4<i32>) {
    if t >= step.t {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let r = row + j;
        if r < p.rows {
            let dst = t * p.y_stride + p.y_off + r;
            let a = f32(g[j] - qsum[t]) * scale[r] / s[t];
            if MODE == 0u {
                y[dst] = a;
            } else if MODE == 1u {
                y[dst] += a;
            } else {
                let b = f32(u[j] - qsum[t]) * scale[p.rows + r] / s[t];
                y[dst] = gate_act(a) * b;
            }
        }
    }
}

// A thread's outputs for token t: rows row.. (sums g) and row + 64.. (sums u); in MODE 2, g and u are the
// gate and up sums of rows row..row+3.
fn mt_store8(t: u32, row: u32, g: vec4<i32>, u: vec4<i32>) {
    if MODE >= 2u {
        mt_store4(t, row, g, u);
    } else {
        mt_store4(t, row, g, g);
        mt_store4(t, row + 64u, u, u);
    }
}

@compute @workgroup_size(256)
fn matmul_ternary_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let tx = lid % 16u;
    let ty = lid / 16u;
    // MODE 2 covers 64 outputs (gate rows in local rows 0..64, up rows in 64..128).
    var r0 = wg.x * 128u;
    if MODE >= 2u {
        r0 = wg.x * 64u;
    }
    let t0 = wg.y * TM;

    var a00 = vec4<i32>(0);
    var a01 = vec4<i32>(0);
    var a10 = vec4<i32>(0);
    var a11 = vec4<i32>(0);
    var a20 = vec4<i32>(0);
    var a21 = vec4<i32>(0);
    var a30 = vec4<i32>(0);
    var a31 = vec4<i32>(0);
    var a40 = vec4<i32>(0);
    var a41 = vec4<i32>(0);
    var a50 = vec4<i32>(0);
    var a51 = vec4<i32>(0);
    var a60 = vec4<i32>(0);
    var a61 = vec4<i32>(0);
    var a70 = vec4<i32>(0);
    var a71 = vec4<i32>(0);
    for (var w0 = 0u; w0 < p.words; w0 += 4u) {
        // Stage: 128 rows x 4 weight words (unpacked to 16 code words) and 128 tokens x 16 activation
        // words, two of each per thread; past the edges, zeros (they add nothing and are never stored).
        for (var j = 0u; j < 2u; j++) {
            let e = lid + 256u * j;
            let lr = e / 4u;
            let kw = e % 4u;
            var wr = r0 + lr;
            var ok = wr < p.rows;
            if MODE >= 2u {
                wr = r0 + lr % 64u;
                ok = wr < p.rows;
                if lr >= 64u {
                    wr += p.rows;
                }
            }
            var word = 0u;
            if ok && w0 + kw < p.words {
                word = w[wr * p.words + w0 + kw];
            }
            for (var sh = 0u; sh < 4u; sh++) {
                tc_s[(4u * kw + sh) * CS + lr / 4u][lr % 4u] = (word >> (2u * sh)) & 0x03030303u;
            }
            let tt = e / 4u;
            var av = vec4<u32>(0u);
            if tt < TM && t0 + tt < step.t && w0 + kw < p.words {
                av = q[(t0 + tt) * p.words + w0 + kw];
            }
            for (var c = 0u; c < 4u; c++) {
                ta_s[(4u * kw + c) * CS + tt / 4u][tt % 4u] = av[c];
            }
        }
        workgroupBarrier();
        for (var k = 0u; k < KS; k++) {
            let c0 = tc_s[k * CS + tx];
            let c1 = tc_s[k * CS + 16u + tx];
            let x0 = ta_s[k * CS + ty];
            a00 += mt_row4(c0, x0.x);
            a01 += mt_row4(c1, x0.x);
            a10 += mt_row4(c0, x0.y);
            a11 += mt_row4(c1, x0.y);
            a20 += mt_row4(c0, x0.z);
            a21 += mt_row4(c1, x0.z);
            a30 += mt_row4(c0, x0.w);
            a31 += mt_row4(c1, x0.w);
            if TM == 64u {
                continue;
            }
            let x1 = ta_s[k * CS + 16u + ty];
            a40 += mt_row4(c0, x1.x);
            a41 += mt_row4(c1, x1.x);
            a50 += mt_row4(c0, x1.y);
            a51 += mt_row4(c1, x1.y);
            a60 += mt_row4(c0, x1.z);
            a61 += mt_row4(c1, x1.z);
            a70 += mt_row4(c0, x1.w);
            a71 += mt_row4(c1, x1.w);
        }
        workgroupBarrier();
    }
    mt_store8(t0 + 4u * ty + 0u, r0 + 4u * tx, a00, a01);
    mt_store8(t0 + 4u * ty + 1u, r0 + 4u * tx, a10, a11);
    mt_store8(t0 + 4u * ty + 2u, r0 + 4u * tx, a20, a21);
    mt_store8(t0 + 4u * ty + 3u, r0 + 4u * tx, a30, a31);
    if TM == 64u {
        return;
    }
    mt_store8(t0 + 64u + 4u * ty + 0u, r0 + 4u * tx, a40, a41);
    mt_store8(t0 + 64u + 4u * ty + 1u, r0 + 4u * tx, a50, a51);
    mt_store8(t0 + 64u + 4u * ty + 2u, r0 + 4u * tx, a60, a61);
    mt_store8(t0 + 64u + 4u * ty + 3u, r0 + 4u * tx, a70, a71);
}
