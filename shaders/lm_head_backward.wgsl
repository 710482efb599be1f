// Backward of lm_head with respect to its input (the head is frozen): dx[t, c] (+)= sum_r dlogits[t, row0 + r] W[r, c]
// over one row tile of the f16 or f32 matrix (layout as lm_head.wgsl). Tiles after the first accumulate.
// Grid (ceil(C/256), T): one thread per (token, column). CPU twin: cpu::lm_head_backward.

override F16: bool = true;

struct Params {
    c: u32,          // C
    rows: u32,       // rows in this tile
    row0: u32,       // first vocabulary row of this tile
    v: u32,          // V, row length of dlogits
    accumulate: u32, // 0: dx = ..., 1: dx += ...
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> wt: array<u32>;           // [rows, C] f16 pairs or f32 bits
@group(0) @binding(3) var<storage, read> dlogits: array<f32>;      // [T, V]
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;     // [T, C]

fn weight(r: u32, c: u32) -> f32 {
    let i = r * p.c + c;
    if F16 {
        return unpack2x16float(wt[i / 2u])[i % 2u];
    }
    return bitcast<f32>(wt[i]);
}

@compute @workgroup_size(256)
fn lm_head_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let c = wg.x * 256u + lid.x;
    let t = wg.y;
    if t >= step.t || c >= p.c {
        return;
    }
    var acc = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        let g = dlogits[t * p.v + p.row0 + r];
        if g != 0.0 {
            acc += g * weight(r, c);
        }
    }
    if p.accumulate == 1u {
        dx[t * p.c + c] += acc;
    } else {
        dx[t * p.c + c] = acc;
    }
}
