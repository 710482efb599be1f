// torch.optim.AdamW step over one parameter tensor (CPU twin: cpu::adamw, which documents the order), on
// the gradient times `gscale` (the global-norm clipping coefficient, 1 when not clipping):
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
    gscale: f32,
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> g: array<f32>;

@compute @workgroup_size(256)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>) {
    _ = step.t; // bound for every kernel alike; the optimizer does not depend on the chunk
    let i = gid.x;
    if i >= p.n {
        return;
    }
    let gi = g[i] * p.gscale;
    var x = param[i] * p.decay;
    let mi = m[i] + p.w1 * (gi - m[i]);
    let vi = v[i] * p.b2 + p.w2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    let denom = sqrt(vi) / p.bc2_sqrt + p.eps;
    x += -p.step_size * (mi / denom);
    param[i] = x;
}
