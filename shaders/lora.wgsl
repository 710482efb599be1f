// The LoRA branch of a targeted projection and its backward, side by side (CPU twins: cpu::lora,
// cpu::lora_backward). Forward, y += scale * B . (A . x), in two dispatches:
//   lora_a:  h[t, r] = sum_i x[t, i] A[r, i]                    grid (R, T), a workgroup reduction each
//   lora_b:  y[t, y_off + o] += scale * sum_r h[t, r] B[o, r]   grid (ceil(O/256), T)
// Backward, in four:
//   lora_dh: dh[t, r] = scale * sum_o dy[t, y_off + o] B[o, r]  grid (R, T)
//   lora_db: dB[o, r] += scale * sum_t dy[t, y_off + o] h[t, r] grid (ceil(O*R/256), 1)
//   lora_da: dA[r, i] += sum_t dh[t, r] x[t, i]                 grid (ceil(R*I/256), 1)
//   lora_dx: dx[t, i] += sum_r dh[t, r] A[r, i]                 grid (ceil(I/256), T)
// x is the projection's unquantized input. Parameter gradients accumulate (micro-batches add up); dx
// accumulates onto the frozen path's gradient. Each entry point binds only the buffers it uses.

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

@compute @workgroup_size(256)
fn lora_a(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let r = wg.x;
    let t = wg.y;
    let lid = lid3.x;
    if t >= step.t {
        return;
    }
    var acc = 0.0;
    for (var i = lid; i < p.inp; i += 256u) {
        acc += x[t * p.x_stride + i] * a[r * p.inp + i];
    }
    let s = wg_sum(acc, lid);
    if lid == 0u {
        h[t * p.rank + r] = s;
    }
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
    let r = wg.x;
    let t = wg.y;
    let lid = lid3.x;
    if t >= step.t {
        return;
    }
    var acc = 0.0;
    for (var o = lid; o < p.out; o += 256u) {
        acc += dy[t * p.y_stride + p.y_off + o] * b[o * p.rank + r];
    }
    let s = wg_sum(acc, lid);
    if lid == 0u {
        dh[t * p.rank + r] = p.scale * s;
    }
}

@compute @workgroup_size(256)
fn lora_db(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    if k >= p.out * p.rank {
        return;
    }
    let o = k / p.rank;
    let r = k % p.rank;
    var acc = 0.0;
    for (var t = 0u; t < step.t; t++) {
        acc += dy[t * p.y_stride + p.y_off + o] * h[t * p.rank + r];
    }
    db[k] += p.scale * acc;
}

@compute @workgroup_size(256)
fn lora_da(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    if k >= p.rank * p.inp {
        return;
    }
    let r = k / p.inp;
    let i = k % p.inp;
    var acc = 0.0;
    for (var t = 0u; t < step.t; t++) {
        acc += dh[t * p.rank + r] * x[t * p.x_stride + i];
    }
    da[k] += acc;
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
