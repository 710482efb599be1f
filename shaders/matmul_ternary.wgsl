// Ternary projection of int8-quantized activations, for one row tile of the weight:
//   y[t, y_off + r] (=|+=) (sum_i T[r, i] * q[t, i]) * scale[r] / s[t]
// Weights stay packed at 2 bits (16 per u32, layout in engine/src/ternary.rs): `(word >> 2s) & 0x03030303`
// gives four codes (T+1) that line up with activation word 4w+s, so one dot4I8Packed does four
// multiply-adds; the +1 offset is removed with qsum[t] = sum_i q[t, i]. Integer sums are exact, so the GPU
// result equals the CPU reference bit for bit up to the final float scaling.
//
// MODE 0 stores, MODE 1 adds into y (the residual stream: saves a separate residual-add kernel), MODE 2 is
// the fused gate/up of the MLP: the tile holds `rows` gate rows followed by the `rows` matching up rows and
// writes relu(gate)^2 * up.
//
// A workgroup is 8 rows x 32 lanes; lanes stride over the words of a row so reads are coalesced, and each
// weight word is reused for TT tokens (prefill).

override MODE: u32 = 0u;
const TT: u32 = 4u;

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
@group(0) @binding(4) var<storage, read> q: array<u32>;          // [T, I/4] packed int8
@group(0) @binding(5) var<storage, read> s: array<f32>;          // [T]
@group(0) @binding(6) var<storage, read> qsum: array<i32>;       // [T]
@group(0) @binding(7) var<storage, read_write> y: array<f32>;    // [T, y_stride]

var<workgroup> red: array<i32, 2048>;   // [2][TT][256]

@compute @workgroup_size(256)
fn matmul_ternary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let lane = lid % 32u;
    let row = wg.x * 8u + lid / 32u;
    let t0 = wg.y * TT;
    var acc: array<i32, TT>;
    var accu: array<i32, TT>;
    let qwords = p.words * 4u;
    if row < p.rows {
        for (var i = lane; i < p.words; i += 32u) {
            let wv = w[row * p.words + i];
            var wu = 0u;
            if MODE == 2u {
                wu = w[(p.rows + row) * p.words + i];
            }
            for (var tt = 0u; tt < TT; tt++) {
                let t = t0 + tt;
                if t < step.t {
                    let base = t * qwords + 4u * i;
                    for (var sh = 0u; sh < 4u; sh++) {
                        let xq = q[base + sh];
                        acc[tt] += dot4I8Packed((wv >> (2u * sh)) & 0x03030303u, xq);
                        if MODE == 2u {
                            accu[tt] += dot4I8Packed((wu >> (2u * sh)) & 0x03030303u, xq);
                        }
                    }
                }
            }
        }
    }
    // Only the tokens this workgroup really has are reduced (one during decode); ntt is uniform.
    let ntt = min(TT, step.t - min(step.t, t0));
    for (var tt = 0u; tt < ntt; tt++) {
        red[tt * 256u + lid] = acc[tt];
        red[1024u + tt * 256u + lid] = accu[tt];
    }
    workgroupBarrier();
    for (var off = 16u; off > 0u; off >>= 1u) {
        if lane < off {
            for (var tt = 0u; tt < ntt; tt++) {
                red[tt * 256u + lid] += red[tt * 256u + lid + off];
                if MODE == 2u {
                    red[1024u + tt * 256u + lid] += red[1024u + tt * 256u + lid + off];
                }
            }
        }
        workgroupBarrier();
    }
    if lane == 0u && row < p.rows {
        for (var tt = 0u; tt < ntt; tt++) {
            let t = t0 + tt;
            if t < step.t {
                let dst = t * p.y_stride + p.y_off + row;
                let g = f32(red[tt * 256u + lid] - qsum[t]) * scale[row] / s[t];
                if MODE == 0u {
                    y[dst] = g;
                } else if MODE == 1u {
                    y[dst] += g;
                } else {
                    let u = f32(red[1024u + tt * 256u + lid] - qsum[t]) * scale[p.rows + row] / s[t];
                    let r = max(g, 0.0);
                    y[dst] = r * r * u;
                }
            }
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

@group(0) @binding(8) var<storage, read> xin: array<f32>;      // [T, I] the unnormalised input rows
@group(0) @binding(9) var<storage, read> nw: array<f32>;       // [I] RMSNorm weight

var<workgroup> xq_s: array<u32, 2048>;   // [I/4] packed int8 activations

// Rows per workgroup of the fused kernel (256 / ROWS lanes per row). More rows per workgroup spread the
// per-workgroup normalisation over more outputs; fewer give more workgroups to hide latency.
override ROWS: u32 = 8u;
var<workgroup> red2: array<i32, 768>;    // [3][256]: gate, up, activation sum

@compute @workgroup_size(256)
fn rmsnorm_matmul_ternary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    if step.t == 0u {
        return;
    }
    let lid = lid3.x;
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
        let ms = wg_sum(acc2, lid) / f32(c);
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
        let sx = 127.0 / max(wg_max(m, lid), 1e-5);
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
                    if MODE == 2u {
                        wu = vec4<u32>(w[baseu + i0], w[baseu + i0 + 1u], w[baseu + i0 + 2u], w[baseu + i0 + 3u]);
                    }
                } else {
                    for (var k = 0u; k < n; k++) {
                        wv[k] = w[base + i0 + k];
                        if MODE == 2u {
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
                        if MODE == 2u {
                            au += dot4I8Packed((wu[k] >> (2u * sh)) & 0x03030303u, xq);
                        }
                    }
                }
            }
        }
        red2[lid] = a;
        red2[256u + lid] = au;
        red2[512u + lid] = qsl;
        workgroupBarrier();
        for (var off = lanes / 2u; off > 0u; off >>= 1u) {
            if lane < off {
                red2[lid] += red2[lid + off];
                red2[256u + lid] += red2[256u + lid + off];
                red2[512u + lid] += red2[512u + lid + off];
            }
            workgroupBarrier();
        }
        let qs = red2[512u + lid];
        if lane == 0u && row < p.rows {
            let dst = t * p.y_stride + p.y_off + row;
            let g = f32(red2[lid] - qs) * scale[row] / sx;
            if MODE == 0u {
                y[dst] = g;
            } else if MODE == 1u {
                y[dst] += g;
            } else {
                let u = f32(red2[256u + lid] - qs) * scale[p.rows + row] / sx;
                let rr = max(g, 0.0);
                y[dst] = rr * rr * u;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// matmul_ternary_tiled: the same projection (MODE 0 stores, MODE 1 adds; not the fused gate/up) for many
// tokens at once, as a register-tiled integer GEMM: a 64-token x 64-row block per workgroup, the input
// walked four weight words (64 columns) at a time with the packed weights and int8 activations staged in
// workgroup memory, so each weight word is read once per 64 tokens (matmul_ternary reads it once per TT =
// 4). The integer sums and the final scaling are the same as above, so both kernels give identical bits.
// Training's forward and recomputation run it. CPU twin: cpu::matmul_ternary. Grid (ceil(rows / 64),
// ceil(T / 64)).

const MW: u32 = 4u;     // weight words per slice (16 activation words)
const MS: u32 = 65u;    // padded stride of the staged slices

var<workgroup> mw_s: array<u32, 260>;    // [MW][MS]: weight word w0 + kw of row r0 + rr
var<workgroup> mq_s: array<u32, 1040>;   // [4 MW][MS]: activation word 4 w0 + aw of token t0 + tt

fn mt_store(t: u32, r: u32, v: vec4<i32>) {
    if t >= step.t {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let row = r + 16u * j;
        if row < p.rows {
            let dst = t * p.y_stride + p.y_off + row;
            let g = f32(v[j] - qsum[t]) * scale[row] / s[t];
            if MODE == 1u {
                y[dst] += g;
            } else {
                y[dst] = g;
            }
        }
    }
}

@compute @workgroup_size(256)
fn matmul_ternary_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let r0 = wg.x * 64u;
    let t0 = wg.y * 64u;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let qwords = p.words * 4u;
    // Four tokens (4ty..) x four rows (tx + 16j) per thread, in named vectors (no indexed arrays: those
    // would sit in local memory).
    var acc0 = vec4<i32>(0);
    var acc1 = vec4<i32>(0);
    var acc2 = vec4<i32>(0);
    var acc3 = vec4<i32>(0);
    for (var w0 = 0u; w0 < p.words; w0 += MW) {
        {
            let rr = lid / MW;
            let kw = lid % MW;
            var v = 0u;
            if r0 + rr < p.rows && w0 + kw < p.words {
                v = w[(r0 + rr) * p.words + w0 + kw];
            }
            mw_s[kw * MS + rr] = v;
        }
        for (var j = 0u; j < 4u; j++) {
            let e = lid + 256u * j;
            let aw = e % (4u * MW);
            let tt = e / (4u * MW);
            var v = 0u;
            if t0 + tt < step.t && 4u * w0 + aw < qwords {
                v = q[(t0 + tt) * qwords + 4u * w0 + aw];
            }
            mq_s[aw * MS + tt] = v;
        }
        workgroupBarrier();
        for (var kw = 0u; kw < MW; kw++) {
            let wb = kw * MS + tx;
            let wv = vec4<u32>(mw_s[wb], mw_s[wb + 16u], mw_s[wb + 32u], mw_s[wb + 48u]);
            for (var sh = 0u; sh < 4u; sh++) {
                let c = (wv >> vec4<u32>(2u * sh)) & vec4<u32>(0x03030303u);
                let ab = (4u * kw + sh) * MS + 4u * ty;
                let a0 = mq_s[ab];
                let a1 = mq_s[ab + 1u];
                let a2 = mq_s[ab + 2u];
                let a3 = mq_s[ab + 3u];
                acc0 += vec4<i32>(dot4I8Packed(c.x, a0), dot4I8Packed(c.y, a0), dot4I8Packed(c.z, a0), dot4I8Packed(c.w, a0));
                acc1 += vec4<i32>(dot4I8Packed(c.x, a1), dot4I8Packed(c.y, a1), dot4I8Packed(c.z, a1), dot4I8Packed(c.w, a1));
                acc2 += vec4<i32>(dot4I8Packed(c.x, a2), dot4I8Packed(c.y, a2), dot4I8Packed(c.z, a2), dot4I8Packed(c.w, a2));
                acc3 += vec4<i32>(dot4I8Packed(c.x, a3), dot4I8Packed(c.y, a3), dot4I8Packed(c.z, a3), dot4I8Packed(c.w, a3));
            }
        }
        workgroupBarrier();
    }
    mt_store(t0 + 4u * ty, r0 + tx, acc0);
    mt_store(t0 + 4u * ty + 1u, r0 + tx, acc1);
    mt_store(t0 + 4u * ty + 2u, r0 + tx, acc2);
    mt_store(t0 + 4u * ty + 3u, r0 + tx, acc3);
}
