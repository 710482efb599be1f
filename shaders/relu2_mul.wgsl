// The gated MLP activation out = relu(g)^2 * u and its backward, side by side (CPU twins: cpu::relu2_mul,
// cpu::relu2_mul_backward). Inference fuses the forward into matmul_ternary's gate/up epilogue; training
// needs g and u themselves (the LoRA branches add to them, and the backward reads them).
//   relu2_mul:          out = relu(g)^2 u
//   relu2_mul_backward: dg = 2 relu(g) u dout,  du = relu(g)^2 dout
// Grid (ceil(F/256), T).

struct Params {
    f: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> dout: array<f32>;         // [T, F]
@group(0) @binding(3) var<storage, read> g: array<f32>;            // [T, F]
@group(0) @binding(4) var<storage, read> u: array<f32>;            // [T, F]
@group(0) @binding(5) var<storage, read_write> dg: array<f32>;     // [T, F] (assigned)
@group(0) @binding(6) var<storage, read_write> du: array<f32>;     // [T, F] (assigned)
@group(0) @binding(7) var<storage, read_write> out: array<f32>;    // [T, F] (relu2_mul)

@compute @workgroup_size(256)
fn relu2_mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = wg.x * 256u + lid.x;
    let t = wg.y;
    if t >= step.t || j >= p.f {
        return;
    }
    let i = t * p.f + j;
    let r = max(g[i], 0.0);
    out[i] = r * r * u[i];
}

@compute @workgroup_size(256)
fn relu2_mul_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = wg.x * 256u + lid.x;
    let t = wg.y;
    if t >= step.t || j >= p.f {
        return;
    }
    let i = t * p.f + j;
    let r = max(g[i], 0.0);
    dg[i] = 2.0 * r * u[i] * dout[i];
    du[i] = r * r * dout[i];
}
