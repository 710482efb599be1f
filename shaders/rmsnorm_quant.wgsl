// RMSNorm, optionally fused with the per-token int8 activation quantizer of the ternary projection that
// consumes it (one pass over the row instead of three).
//   y = w * (x / sqrt(mean(x^2) + eps))
//   s = 127 / max(|y|).clamp(1e-5);  q = clamp(round(y * s), -128, 127)   (round is half-to-even in WGSL)
// q is written packed, four int8 per u32 (byte k = element 4j+k), ready for dot4I8Packed, together with
// the per-token scale s and the integer sum of q (the ternary kernel uses it to undo the +1 code offset).
// One workgroup per token.

struct Params {
    c: u32,      // row length
    eps: f32,
    acc: u32,    // rmsnorm_backward: 1 adds onto dx (a residual's gradient already there), 0 assigns
    _b: u32,
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> w: array<f32>;            // [C]
@group(0) @binding(3) var<storage, read> x: array<f32>;            // [T, C]
@group(0) @binding(4) var<storage, read_write> q: array<u32>;      // [T, C/4]   (rmsnorm_quant)
@group(0) @binding(5) var<storage, read_write> s: array<f32>;      // [T]        (rmsnorm_quant)
@group(0) @binding(6) var<storage, read_write> qsum: array<i32>;   // [T]        (rmsnorm_quant)
@group(0) @binding(7) var<storage, read_write> y: array<f32>;      // [T, C]     (rmsnorm)
@group(0) @binding(8) var<storage, read> dy: array<f32>;           // [T, C]     (rmsnorm_backward)
@group(0) @binding(9) var<storage, read_write> dx: array<f32>;     // [T, C]     (rmsnorm_backward)

// The row's max |y| and the sum of its int8 codes, gathered with workgroup atomics: both are exact in any
// order (the max of non-negative floats orders as their bits), so one barrier each replaces a tree of
// eight, with the same result. The mean square keeps its tree: a float sum's bits depend on the order,
// and rmsnorm_matmul_ternary repeats this one.
var<workgroup> amax: atomic<u32>;
var<workgroup> asum: atomic<i32>;

// Four neighbouring elements per step (four loads in flight); rmsnorm_matmul_ternary in
// matmul_ternary.wgsl repeats this exact order so that fused and unfused paths agree bit for bit: `lid`
// is lane_index's numbering, and reduce_sum comes from reduce.wgsl or reduce_subgroup.wgsl, whichever
// the fused kernel is compiled with (both follow `Gpu::subgroups`).
fn inv_rms(t: u32, lid: u32) -> f32 {
    var acc = 0.0;
    let o = t * p.c;
    for (var j = lid; j < p.c / 4u; j += 256u) {
        let b = o + 4u * j;
        let v0 = x[b];
        let v1 = x[b + 1u];
        let v2 = x[b + 2u];
        let v3 = x[b + 3u];
        acc += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
    }
    let ms = reduce_sum(acc, lid) / f32(p.c);
    return 1.0 / sqrt(ms + p.eps);
}

@compute @workgroup_size(256)
fn rmsnorm_quant(@builtin(workgroup_id) wg: vec3<u32>, ln: Lane) {
    let t = wg.x;
    let lid = lane_index(ln);
    if t >= step.t {
        return;
    }
    if lid == 0u {
        atomicStore(&amax, 0u);
        atomicStore(&asum, 0);
    }
    // (inv_rms's barriers order those stores before the atomics below.)
    let r = inv_rms(t, lid);
    var m = 0.0;
    for (var j = lid; j < p.c / 4u; j += 256u) {
        let b = 4u * j;
        let o = t * p.c + b;
        let y0 = abs(w[b] * (x[o] * r));
        let y1 = abs(w[b + 1u] * (x[o + 1u] * r));
        let y2 = abs(w[b + 2u] * (x[o + 2u] * r));
        let y3 = abs(w[b + 3u] * (x[o + 3u] * r));
        m = max(m, max(max(y0, y1), max(y2, y3)));
    }
    atomicMax(&amax, bitcast<u32>(m));
    workgroupBarrier();
    let scale = 127.0 / max(bitcast<f32>(atomicLoad(&amax)), 1e-5);
    var sum = 0;
    let words = p.c / 4u;
    for (var j = lid; j < words; j += 256u) {
        var word = 0u;
        for (var k = 0u; k < 4u; k++) {
            let i = 4u * j + k;
            let v = i32(clamp(round(w[i] * (x[t * p.c + i] * r) * scale), -128.0, 127.0));
            sum += v;
            word |= (u32(v) & 0xffu) << (8u * k);
        }
        q[t * words + j] = word;
    }
    atomicAdd(&asum, sum);
    workgroupBarrier();
    if lid == 0u {
        s[t] = scale;
        qsum[t] = atomicLoad(&asum);
    }
}

@compute @workgroup_size(256)
fn rmsnorm(@builtin(workgroup_id) wg: vec3<u32>, ln: Lane) {
    let t = wg.x;
    let lid = lane_index(ln);
    if t >= step.t {
        return;
    }
    let r = inv_rms(t, lid);
    for (var i = lid; i < p.c; i += 256u) {
        y[t * p.c + i] = w[i] * (x[t * p.c + i] * r);
    }
}

// Backward of RMSNorm with respect to its input (the norm weights are frozen under LoRA):
//   r = 1/sqrt(mean(x^2) + eps),  dx = r * w * dy - x * r^3 * sum(w * dy * x) / C
// One workgroup per token; dx is assigned. CPU twin: cpu::rmsnorm_backward.
@compute @workgroup_size(256)
fn rmsnorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let t = wg.x;
    let lid = lid3.x;
    if t >= step.t {
        return;
    }
    let o = t * p.c;
    var sq = 0.0;
    var dot = 0.0;
    for (var j = lid; j < p.c; j += 256u) {
        let v = x[o + j];
        sq += v * v;
        dot += w[j] * dy[o + j] * v;
    }
    let ms = wg_sum(sq, lid) / f32(p.c);
    let d = wg_sum(dot, lid);
    let r = 1.0 / sqrt(ms + p.eps);
    let k = r * r * r * d / f32(p.c);
    for (var j = lid; j < p.c; j += 256u) {
        let g = r * w[j] * dy[o + j] - x[o + j] * k;
        if p.acc == 1u {
            dx[o + j] += g;
        } else {
            dx[o + j] = g;
        }
    }
}
