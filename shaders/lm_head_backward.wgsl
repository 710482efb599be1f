// Backward of lm_head with respect to its input (the head is frozen):
//   dx[lm_t0 + t, c] (+)= sum_r dlogits[t, row0 + r] W[r, c]
// over one row tile of the f16 or f32 matrix (layout as lm_head.wgsl), for the step.lm_t rows of a token
// chunk that starts at step.lm_t0 (the trainer runs the head in chunks so that only chunk x V logits live at
// once). Tiles after the first accumulate. CPU twin: cpu::lm_head_backward.
//
// dX[lm_t, C] = dlogits[lm_t, rows] . W[rows, C] on the shared tiled GEMM (gemm_tile.wgsl, prepended): the
// vocabulary walked in slices staged in workgroup memory, so the matrix is read once per 128 tokens instead
// of once per token.

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
@group(0) @binding(3) var<storage, read> dlogits: array<f32>;      // [lm_t, V]
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;     // [T, C]

// A[t, r..r+4] = dlogits[t, row0 + r..], zero past the chunk or the tile.
fn gemm_a(t: u32, r: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if t < step.lm_t {
        for (var i = 0u; i < 4u; i++) {
            if r + i < p.rows {
                v[i] = dlogits[t * p.v + p.row0 + r + i];
            }
        }
    }
    return v;
}

const GEMM_B_K: bool = false;

// B[r, c..c+4] = W[r, c..c+4].
fn gemm_b(r: u32, c: u32) -> vec4<f32> {
    return head_row4(r, c);
}

fn gemm_store(t: u32, c: u32, v: vec4<f32>) {
    if t >= step.lm_t {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if c + j < p.c {
            let at = (step.lm_t0 + t) * p.c + c + j;
            if p.accumulate == 1u {
                dx[at] += v[j];
            } else {
                dx[at] = v[j];
            }
        }
    }
}

// Grid (ceil(C / 128), ceil(lm_t / 128)).
@compute @workgroup_size(256)
fn lm_head_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    gemm_tile(wg.y * 128u, wg.x * 128u, p.rows, lid3.x);
}
