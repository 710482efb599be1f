// Per-token negative log-likelihood: nll[t] = logsumexp(logits[t]) - logits[t, target[t]].
// Scoring reduces the [T, V] logits to T numbers on the device, so a 4096-token window never copies
// gigabytes of logits back. One workgroup per token.

struct Params {
    v: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> logits: array<f32>;       // [lm_t, V]
@group(0) @binding(3) var<storage, read> targets: array<u32>;      // [T] targets of the chunk rows
@group(0) @binding(4) var<storage, read_write> out: array<f32>;    // [T]
@group(0) @binding(5) var<storage, read> dnll: array<f32>;         // [T]     (nll_backward)
@group(0) @binding(6) var<storage, read_write> dlogits: array<f32>; // [T, V] (nll_backward)


@compute @workgroup_size(256)
fn nll(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let t = wg.x;
    let lid = lid3.x;
    if t >= step.lm_t {
        return;
    }
    let base = t * p.v;
    var m = -3.0e38;
    for (var i = lid; i < p.v; i += 256u) {
        m = max(m, logits[base + i]);
    }
    let mx = wg_max(m, lid);
    var acc = 0.0;
    for (var i = lid; i < p.v; i += 256u) {
        acc += exp(logits[base + i] - mx);
    }
    let sum = wg_sum(acc, lid);
    if lid == 0u {
        out[step.lm_t0 + t] = log(sum) + mx - logits[base + targets[step.lm_t0 + t]];
    }
}

// Backward of the cross-entropy: dlogits[t] = (softmax(logits[t]) - onehot(target[t])) * dnll[t]; a
// position the loss ignores has dnll[t] = 0 and gets zeros. One workgroup per token of the chunk
// (step.lm_t rows of logits, whose targets and weights start at step.lm_t0).
// CPU twin: cpu::nll_backward.
@compute @workgroup_size(256)
fn nll_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let t = wg.x;
    let lid = lid3.x;
    if t >= step.lm_t {
        return;
    }
    let base = t * p.v;
    let d = dnll[step.lm_t0 + t];
    var m = -3.0e38;
    for (var i = lid; i < p.v; i += 256u) {
        m = max(m, logits[base + i]);
    }
    m = wg_max(m, lid);
    var s = 0.0;
    for (var i = lid; i < p.v; i += 256u) {
        s += exp(logits[base + i] - m);
    }
    s = wg_sum(s, lid);
    let tg = targets[step.lm_t0 + t];
    for (var i = lid; i < p.v; i += 256u) {
        var g = 0.0;
        if d != 0.0 {
            g = exp(logits[base + i] - m) / s * d;
            if i == tg {
                g -= d;
            }
        }
        dlogits[base + i] = g;
    }
}
