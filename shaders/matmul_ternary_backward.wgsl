// Backward of a frozen ternary projection with respect to its input, by the straight-through estimator:
//   dx[t, i] (+)= sum_o T[o, i] * scale[o] * dy[t, row0 + o]
// over the rows [row0, row0 + rows) of one weight tile (bitnode's packed layout, see engine/src/ternary.rs:
// element e = 16w + 4s + k of a row sits at bits 8k + 2s of word w). The packed weights are only read.
// CPU twin: cpu::matmul_ternary_backward.
//
// dX[T, I] = dY[T, O] . W[O, I] on the shared tiled GEMM (gemm_tile.wgsl, prepended): A = dy, B = the
// weights decoded to code * scale as they are staged, so each packed word is read once per 128 tokens (the
// first version read every weight once per token and ran 10x slower at T = 512).

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

// A[t, o..o+4] = dy[t, row0 + o..], zero past the chunk or the tile.
fn gemm_a(t: u32, o: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if t < step.t {
        for (var i = 0u; i < 4u; i++) {
            if o + i < p.rows {
                v[i] = dy[t * p.dy_stride + p.row0 + o + i];
            }
        }
    }
    return v;
}

const GEMM_B_K: bool = false;

// B[o, n..n+4] = code * scale of row o, columns n..n+4 (n a multiple of 4): element 16w + 4s + k sits at
// bits 8k + 2s of word w, so the four are the bytes of word w shifted by 2s.
fn gemm_b(o: u32, n: u32) -> vec4<f32> {
    let word = n / 16u;
    if o >= p.rows || word >= p.words {
        return vec4<f32>(0.0);
    }
    let codes = (w[o * p.words + word] >> (2u * ((n / 4u) % 4u))) & 0x03030303u;
    let c = vec4<f32>(unpack4xU8(codes)) - vec4<f32>(1.0);
    return c * scales[o];
}

fn gemm_store(t: u32, n: u32, v: vec4<f32>) {
    let inp = 16u * p.words;
    if t >= step.t {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if n + j < inp {
            let at = t * inp + n + j;
            if p.accumulate == 1u {
                dx[at] += v[j];
            } else {
                dx[at] = v[j];
            }
        }
    }
}

// Grid (ceil(I / 128), ceil(T / 128)).
@compute @workgroup_size(256)
fn matmul_ternary_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    gemm_tile(wg.y * 128u, wg.x * 128u, p.rows, lid3.x);
}
