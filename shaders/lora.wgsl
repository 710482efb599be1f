// The LoRA branch of a targeted projection and its backward, side by side (CPU twins: cpu::lora,
// cpu::lora_backward). Forward, y += scale * B . (A . x), in two dispatches:
//   lora_a:  h[t, r] = sum_i x[t, i] A[r, i]                    grid (ceil(R/16), ceil(T/16))
//   lora_b:  y[t, y_off + o] += scale * sum_r h[t, r] B[o, r]   grid (ceil(O/256), T)
// Backward, in four:
//   lora_dh: dh[t, r] = scale * sum_o dy[t, y_off + o] B[o, r]  grid (ceil(R/16), ceil(T/16))
//   lora_db: dB[o, r] += scale * sum_t dy[t, y_off + o] h[t, r] grid (ceil(O/32), 1)
//   lora_da: dA[r, i] += sum_t dh[t, r] x[t, i]                 grid (ceil(I/32), 1)
//   lora_dx: dx[t, i] += sum_r dh[t, r] A[r, i]                 grid (ceil(I/256), T)
// x is the projection's unquantized input. Parameter gradients accumulate (micro-batches add up); dx
// accumulates onto the frozen path's gradient.
//
// lora_a and lora_dh are one "row dot" body (a 16-token x 16-rank block per workgroup, the long dimension
// staged through workgroup memory 64 at a time), lora_da and lora_db one "outer product over the tokens"
// body (32 columns x 8 token lanes per workgroup, 16 ranks in registers, the lanes summed once at the end).
// The first versions took a workgroup and a barrier tree per (token, rank) and a serial loop over every
// token per gradient element; with micro-batches of thousands of rows those loops were the slow part.
// WGSL cannot pass a buffer to a function, so the two entry points of a body bind their buffers by role
// (bindings 12..14: the body's two inputs and its output) and the body picks the indexing by WHICH.

struct Params {
    inp: u32,      // I
    out: u32,      // O
    rank: u32,     // R
    scale: f32,    // alpha / r
    x_stride: u32, // columns of x (and dx)
    y_stride: u32, // columns of y (and dy)
    y_off: u32,    // first column of y / dy this projection covers
    _a: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> x: array<f32>;            // [T, x_stride]
@group(0) @binding(3) var<storage, read> a: array<f32>;            // [R, I]
@group(0) @binding(4) var<storage, read> b: array<f32>;            // [O, R]
@group(0) @binding(5) var<storage, read_write> h: array<f32>;      // [T, R] (lora_a writes, the rest read)
@group(0) @binding(6) var<storage, read_write> y: array<f32>;      // [T, y_stride]
@group(0) @binding(7) var<storage, read> dy: array<f32>;           // [T, y_stride]
@group(0) @binding(8) var<storage, read_write> dh: array<f32>;     // [T, R]
@group(0) @binding(9) var<storage, read_write> da: array<f32>;     // [R, I]
@group(0) @binding(10) var<storage, read_write> db: array<f32>;    // [O, R]
@group(0) @binding(11) var<storage, read_write> dx: array<f32>;    // [T, x_stride]
// The shared bodies' buffers, by role (see above).
@group(0) @binding(12) var<storage, read> bu: array<f32>;          // x or dy
@group(0) @binding(13) var<storage, read> bw: array<f32>;          // A, B (row dot) or dh, h (outer)
@group(0) @binding(14) var<storage, read_write> bo: array<f32>;    // h, dh (row dot) or dA, dB (outer)

// Row dot: out[t, r] = sum_k u(t, k) w(r, k) over K. WHICH 0 is lora_a (u = x, w = A, K = I), 1 is
// lora_dh (u = dy, w = B^T, K = O).
fn rd_u(which: u32, t: u32, k: u32) -> f32 {
    if which == 0u {
        return bu[t * p.x_stride + k];
    }
    return bu[t * p.y_stride + p.y_off + k];
}

fn rd_w(which: u32, r: u32, k: u32) -> f32 {
    if which == 0u {
        return bw[r * p.inp + k];
    }
    return bw[k * p.rank + r];
}

var<workgroup> rd_us: array<vec4<f32>, 272>;   // [16 tokens][17]: u(t0 + tt, k0 + 4c..)
var<workgroup> rd_ws: array<vec4<f32>, 272>;   // [16 ranks][17]: w(r0 + rr, k0 + 4c..)

fn row_dot(which: u32, wg: vec3<u32>, lid: u32) {
    let r0 = wg.x * 16u;
    let t0 = wg.y * 16u;
    let tr = lid % 16u;
    let tt = lid / 16u;
    var kn = p.inp;
    if which == 1u {
        kn = p.out;
    }
    var acc = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < kn; k0 += 64u) {
        for (var j = 0u; j < 4u; j++) {
            let e = lid + 256u * j;
            let row = e / 64u;
            let kk = e % 64u;
            let k = k0 + kk;
            var uv = 0.0;
            if t0 + row < step.t && k < kn {
                uv = rd_u(which, t0 + row, k);
            }
            rd_us[row * 17u + kk / 4u][kk % 4u] = uv;
            var wv = 0.0;
            if r0 + row < p.rank && k < kn {
                wv = rd_w(which, r0 + row, k);
            }
            rd_ws[row * 17u + kk / 4u][kk % 4u] = wv;
        }
        workgroupBarrier();
        for (var c = 0u; c < 16u; c++) {
            acc += rd_us[tt * 17u + c] * rd_ws[tr * 17u + c];
        }
        workgroupBarrier();
    }
    let t = t0 + tt;
    let r = r0 + tr;
    if t < step.t && r < p.rank {
        let v = (acc.x + acc.y) + (acc.z + acc.w);
        if which == 0u {
            bo[t * p.rank + r] = v;
        } else {
            bo[t * p.rank + r] = p.scale * v;
        }
    }
}

@compute @workgroup_size(256)
fn lora_a(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    row_dot(0u, wg, lid3.x);
}

@compute @workgroup_size(256)
fn lora_b(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let o = wg.x * 256u + lid.x;
    let t = wg.y;
    if t >= step.t || o >= p.out {
        return;
    }
    var acc = 0.0;
    for (var r = 0u; r < p.rank; r++) {
        acc += h[t * p.rank + r] * b[o * p.rank + r];
    }
    y[t * p.y_stride + p.y_off + o] += p.scale * acc;
}

@compute @workgroup_size(256)
fn lora_dh(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    row_dot(1u, wg, lid3.x);
}

// Outer product over the tokens: g[col, r] (+)= sum_t u(t, col) v(t, r). WHICH 0 is lora_da (u = x,
// v = dh, columns I, into da [R, I]), 1 is lora_db (u = dy, v = h, columns O, into db [O, R], times scale).
fn op_u(which: u32, t: u32, col: u32) -> f32 {
    if which == 0u {
        return bu[t * p.x_stride + col];
    }
    return bu[t * p.y_stride + p.y_off + col];
}

fn op_v(which: u32, t: u32, r: u32) -> f32 {
    if r >= p.rank {
        return 0.0;
    }
    return bw[t * p.rank + r];
}

fn op_v4(which: u32, t: u32, r: u32) -> vec4<f32> {
    return vec4<f32>(op_v(which, t, r), op_v(which, t, r + 1u), op_v(which, t, r + 2u), op_v(which, t, r + 3u));
}

var<workgroup> op_s: array<vec4<f32>, 1024>;   // [8 lanes][32 columns][4]: the lanes' partial sums

fn outer_tokens(which: u32, wg: vec3<u32>, lid: u32) {
    var ncols = p.inp;
    if which == 1u {
        ncols = p.out;
    }
    let c = lid % 32u;
    let lane = lid / 32u;
    let col = wg.x * 32u + c;
    // Sixteen ranks at a time in named vectors (an indexed array would sit in local memory on NVIDIA).
    for (var r0 = 0u; r0 < p.rank; r0 += 16u) {
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
        var a2 = vec4<f32>(0.0);
        var a3 = vec4<f32>(0.0);
        if col < ncols {
            for (var t = lane; t < step.t; t += 8u) {
                let u = op_u(which, t, col);
                a0 += u * op_v4(which, t, r0);
                a1 += u * op_v4(which, t, r0 + 4u);
                a2 += u * op_v4(which, t, r0 + 8u);
                a3 += u * op_v4(which, t, r0 + 12u);
            }
        }
        let base = (lane * 32u + c) * 4u;
        op_s[base] = a0;
        op_s[base + 1u] = a1;
        op_s[base + 2u] = a2;
        op_s[base + 3u] = a3;
        workgroupBarrier();
        // 32 columns x 16 ranks: thread (c, lane) sums ranks 2 lane and 2 lane + 1 over the 8 lanes.
        for (var jr = 0u; jr < 2u; jr++) {
            let rr = 2u * lane + jr;
            var sum = 0.0;
            for (var l = 0u; l < 8u; l++) {
                sum += op_s[(l * 32u + c) * 4u + rr / 4u][rr % 4u];
            }
            let r = r0 + rr;
            if col < ncols && r < p.rank {
                if which == 0u {
                    bo[r * p.inp + col] += sum;
                } else {
                    bo[col * p.rank + r] += p.scale * sum;
                }
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn lora_db(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    outer_tokens(1u, wg, lid3.x);
}

@compute @workgroup_size(256)
fn lora_da(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    outer_tokens(0u, wg, lid3.x);
}

@compute @workgroup_size(256)
fn lora_dx(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = wg.x * 256u + lid.x;
    let t = wg.y;
    if t >= step.t || i >= p.inp {
        return;
    }
    var acc = 0.0;
    for (var r = 0u; r < p.rank; r++) {
        acc += dh[t * p.rank + r] * a[r * p.inp + i];
    }
    dx[t * p.x_stride + i] += acc;
}
