// The gated SiLU MLP activation of the 1bitLLM family (bitnet_b1_58-*, QVAC's TQ1_0/TQ2_0 models) and its
// backward, the twin of relu2_mul.wgsl (CPU twins: cpu::silu_mul, cpu::silu_mul_backward). Inference
// fuses the forward into matmul_ternary's gate/up epilogue (MODE 3); training needs g and u themselves.
//   silu_mul:          out = silu(g) u,  silu(g) = g sigmoid(g)
//   silu_mul_backward: dg = sigmoid(g) (1 + g (1 - sigmoid(g))) u dout,  du = silu(g) dout
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
@group(0) @binding(7) var<storage, read_write> out: array<f32>;    // [T, F] (silu_mul)

@compute @workgroup_size(256)
fn silu_mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = wg.x * 256u + lid.x;
    let t = wg.y;
    if t >= step.t || j >= p.f {
        return;
    }
    let i = t * p.f + j;
    let x = g[i];
    out[i] = x * sigmoid(x) * u[i];
}

@compute @workgroup_size(256)
fn silu_mul_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = wg.x * 256u + lid.x;
    let t = wg.y;
    if t >= step.t || j >= p.f {
        return;
    }
    let i = t * p.f + j;
    let x = g[i];
    let sg = sigmoid(x);
    dg[i] = sg * (1.0 + x * (1.0 - sg)) * u[i] * dout[i];
    du[i] = x * sg * dout[i];
}
