// Backward of a frozen ternary projection with respect to its input, by the straight-through estimator:
//   dx[t, i] (+)= sum_o T[o, i] * scale[o] * dy[t, row0 + o]
// over the rows [row0, row0 + rows) of one weight tile (bitnode's packed layout, see engine/src/ternary.rs:
// element e = 16w + 4s + k of a row sits at bits 8k + 2s of word w). The packed weights are only read.
// CPU twin: cpu::matmul_ternary_backward.
//
// A register-tiled GEMM, dX[T, I] = dY[T, O] . W[O, I]: each workgroup owns a 64-token x 64-column block of
// dx and walks O in slices of 16 rows. A slice of dy and the decoded (code * scale) weights are staged in
// workgroup memory, so each packed word is read once per 64 tokens (the first version read every weight
// once per token and ran 10x slower at T = 512). Each thread keeps 4 tokens x 4 columns in registers.

const BT: u32 = 64u;   // tokens per workgroup
const BN: u32 = 64u;   // input columns per workgroup (4 packed words)
const BK: u32 = 16u;   // weight rows per slice
const SA: u32 = 65u;   // padded row stride of the dy slice (fewer bank conflicts on the transposing store)

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

var<workgroup> sa: array<f32, 1040>;  // [BK][SA]: dy[t0 + tt, row0 + k0 + kk]
var<workgroup> sb: array<f32, 1024>;  // [BK][BN]: code * scale of row k0 + kk, column n0 + nn

// Grid (ceil(I / 64), ceil(T / 64)).
@compute @workgroup_size(256)
fn matmul_ternary_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let inp = 16u * p.words;
    let n0 = wg.x * BN;
    let t0 = wg.y * BT;
    let tx = lid % 16u;
    let ty = lid / 16u;
    // Four rows (tokens) of four columns each, in named vectors: an indexed array here would live in
    // local memory on NVIDIA (naga's bounds checks keep the driver from promoting it; measured 10x slower).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.rows; k0 += BK) {
        // dy slice: 16 consecutive rows per token, so 16 neighbouring lanes read one contiguous run.
        for (var j = 0u; j < 4u; j++) {
            let e = lid + 256u * j;
            let kk = e % BK;
            let tt = e / BK;
            let t = t0 + tt;
            let o = k0 + kk;
            var v = 0.0;
            if t < step.t && o < p.rows {
                v = dy[t * p.dy_stride + p.row0 + o];
            }
            sa[kk * SA + tt] = v;
        }
        // Weights: each thread decodes 4 columns (one 8-bit lane of a word: k = 0..3 at fixed s).
        {
            let kk = lid / 16u;
            let c4 = lid % 16u;
            let o = k0 + kk;
            let word = n0 / 16u + c4 / 4u;
            var wv = 0u;
            var sc = 0.0;
            if o < p.rows && word < p.words {
                wv = w[o * p.words + word];
                sc = scales[o];
            }
            let s = c4 % 4u;
            for (var k = 0u; k < 4u; k++) {
                let code = i32((wv >> (8u * k + 2u * s)) & 3u) - 1;
                // Column 16 * word + 4s + k of the row.
                sb[kk * BN + (c4 / 4u) * 16u + 4u * s + k] = f32(code) * sc;
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let ab = kk * SA + 4u * ty;
            let bb = kk * BN + tx;
            let b = vec4<f32>(sb[bb], sb[bb + 16u], sb[bb + 32u], sb[bb + 48u]);
            acc0 += sa[ab] * b;
            acc1 += sa[ab + 1u] * b;
            acc2 += sa[ab + 2u] * b;
            acc3 += sa[ab + 3u] * b;
        }
        workgroupBarrier();
    }
    store(t0 + 4u * ty, n0 + tx, inp, acc0);
    store(t0 + 4u * ty + 1u, n0 + tx, inp, acc1);
    store(t0 + 4u * ty + 2u, n0 + tx, inp, acc2);
    store(t0 + 4u * ty + 3u, n0 + tx, inp, acc3);
}

fn store(t: u32, n: u32, inp: u32, v: vec4<f32>) {
    if t >= step.t {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let c = n + 16u * j;
        if c < inp {
            let at = t * inp + c;
            if p.accumulate == 1u {
                dx[at] += v[j];
            } else {
                dx[at] = v[j];
            }
        }
    }
}
