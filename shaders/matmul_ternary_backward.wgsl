// Backward of a frozen ternary projection with respect to its input, by the straight-through estimator:
//   dx[t, i] (+)= sum_o T[o, i] * scale[o] * dy[t, row0 + o]
// over the rows [row0, row0 + rows) of one weight tile (bitnode's packed layout, see engine/src/ternary.rs:
// element e = 16w + 4s + k of a row sits at bits 8k + 2s of word w). The packed weights are only read.
// Grid (ceil(I/256), T): one thread per (token, input column). CPU twin: cpu::matmul_ternary_backward.

struct Params {
    words: u32,      // u32 words per row (I / 16)
    rows: u32,       // rows in this tile
    row0: u32,       // first column of dy this tile covers
    dy_stride: u32,  // columns of dy
    accumulate: u32, // 0: dx = ..., 1: dx += ... (tiles after the first)
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> w: array<u32>;            // [rows, words]
@group(0) @binding(3) var<storage, read> scales: array<f32>;       // [rows]
@group(0) @binding(4) var<storage, read> dy: array<f32>;           // [T, dy_stride]
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;     // [T, 16 * words]

@compute @workgroup_size(256)
fn matmul_ternary_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = wg.x * 256u + lid.x;
    let t = wg.y;
    let inp = 16u * p.words;
    if t >= step.t || i >= inp {
        return;
    }
    let r = i % 16u;
    let shift = 8u * (r % 4u) + 2u * (r / 4u);
    let word = i / 16u;
    var acc = 0.0;
    for (var o = 0u; o < p.rows; o++) {
        let code = i32((w[o * p.words + word] >> shift) & 3u) - 1;
        acc += f32(code) * scales[o] * dy[t * p.dy_stride + p.row0 + o];
    }
    let at = t * inp + i;
    if p.accumulate == 1u {
        dx[at] += acc;
    } else {
        dx[at] = acc;
    }
}
