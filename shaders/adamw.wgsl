// torch.optim.AdamW step over one parameter tensor (CPU twin: cpu::adamw, which documents the order), on
// the gradient times clip[0] (the global-norm clipping coefficient `grad_clip` leaves there, 1 when not
// clipping):
//   p *= 1 - lr*wd;  m += (1-b1)(g - m);  v = b2 v + (1-b2) g^2;  p -= step_size * m / (sqrt(v)/bc2_sqrt + eps)
// The bias corrections are computed on the host in double precision, as Python does. Grid ceil(N/256).

struct Params {
    n: u32,
    decay: f32,      // 1 - lr * weight_decay
    step_size: f32,  // lr / (1 - b1^step)
    bc2_sqrt: f32,   // sqrt(1 - b2^step)
    w1: f32,         // 1 - b1
    b2: f32,
    w2: f32,         // 1 - b2
    eps: f32,
    _a: u32,
    _b: u32,
    _c: u32,
    _d: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> g: array<f32>;
@group(0) @binding(6) var<storage, read_write> clip: array<f32>;   // [coef, norm] from grad_clip

@compute @workgroup_size(256)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>) {
    _ = step.t; // bound for every kernel alike; the optimizer does not depend on the chunk
    let i = gid.x;
    if i >= p.n {
        return;
    }
    let gi = g[i] * clip[0];
    var x = param[i] * p.decay;
    let mi = m[i] + p.w1 * (gi - m[i]);
    let vi = v[i] * p.b2 + p.w2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    let denom = sqrt(vi) / p.bc2_sqrt + p.eps;
    x += -p.step_size * (mi / denom);
    param[i] = x;
}

// ---------------------------------------------------------------------------------------------------------
// Global-norm gradient clipping on the device (torch.nn.utils.clip_grad_norm_), so that a step never
// downloads the gradients (80 MB per step for 2B-4T at rank 16):
//   grad_sq_sum:  sq[slot] = sum of g^2 over one tensor (one workgroup, strided, then the tree of wg_sum).
//                 CPU twin: cpu::grad_sq_sum. Grid (1).
//   grad_clip:    norm = sqrt(sum_i sqrt(sq[i])^2) (torch's norm of the per-tensor norms), coef = min(max /
//                 (norm + 1e-6), 1) when clipping, else 1; clip = [coef, norm]. CPU twin: cpu::grad_clip.
// (They share adamw's Params slots: n = elements (grad_sq_sum) or tensors (grad_clip), decay = the slot
// (grad_sq_sum) or max_norm (grad_clip), step_size's bits = 1 to clip.)

@group(0) @binding(7) var<storage, read_write> sq: array<f32>;

@compute @workgroup_size(256)
fn grad_sq_sum(@builtin(local_invocation_id) lid3: vec3<u32>) {
    _ = step.t;
    let lid = lid3.x;
    var acc = 0.0;
    for (var i = lid; i < p.n; i += 256u) {
        acc += g[i] * g[i];
    }
    let total = wg_sum(acc, lid);
    if lid == 0u {
        sq[bitcast<u32>(p.decay)] = total;
    }
}

@compute @workgroup_size(256)
fn grad_clip(@builtin(local_invocation_id) lid3: vec3<u32>) {
    _ = step.t;
    let lid = lid3.x;
    var acc = 0.0;
    for (var i = lid; i < p.n; i += 256u) {
        let nrm = sqrt(sq[i]);
        acc += nrm * nrm;
    }
    let norm = sqrt(wg_sum(acc, lid));
    if lid == 0u {
        var coef = 1.0;
        if bitcast<u32>(p.step_size) == 1u {
            coef = min(p.decay / (norm + 1e-6), 1.0);
        }
        clip[0] = coef;
        clip[1] = norm;
    }
}
