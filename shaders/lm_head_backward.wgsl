// Backward of lm_head with respect to its input (the head is frozen):
//   dx[lm_t0 + t, c] (+)= sum_r dlogits[t, row0 + r] W[r, c]
// over one row tile of the f16 or f32 matrix (layout as lm_head.wgsl), for the step.lm_t rows of a token
// chunk that starts at step.lm_t0 (the trainer runs the head in chunks so that only chunk x V logits live at
// once). Tiles after the first accumulate. CPU twin: cpu::lm_head_backward.
//
// A register-tiled GEMM, as matmul_ternary_backward: a 64-token x 64-column block per workgroup, the
// vocabulary walked in slices of 16 rows staged in workgroup memory, so the matrix is read once per 64
// tokens instead of once per token.

override F16: bool = true;

const BT: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const SA: u32 = 65u;

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

var<workgroup> sa: array<f32, 1040>;  // [BK][SA]
var<workgroup> sb: array<f32, 1024>;  // [BK][BN]

fn weight(r: u32, c: u32) -> f32 {
    let i = r * p.c + c;
    if F16 {
        return unpack2x16float(wt[i / 2u])[i % 2u];
    }
    return bitcast<f32>(wt[i]);
}

// Grid (ceil(C / 64), ceil(lm_t / 64)).
@compute @workgroup_size(256)
fn lm_head_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
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
        for (var j = 0u; j < 4u; j++) {
            let e = lid + 256u * j;
            let kk = e % BK;
            let tt = e / BK;
            let t = t0 + tt;
            let r = k0 + kk;
            var v = 0.0;
            if t < step.lm_t && r < p.rows {
                v = dlogits[t * p.v + p.row0 + r];
            }
            sa[kk * SA + tt] = v;
        }
        for (var j = 0u; j < 4u; j++) {
            let e = lid + 256u * j;
            let kk = e / BN;
            let nn = e % BN;
            let r = k0 + kk;
            let c = n0 + nn;
            var v = 0.0;
            if r < p.rows && c < p.c {
                v = weight(r, c);
            }
            sb[kk * BN + nn] = v;
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
    store(t0 + 4u * ty, n0 + tx, acc0);
    store(t0 + 4u * ty + 1u, n0 + tx, acc1);
    store(t0 + 4u * ty + 2u, n0 + tx, acc2);
    store(t0 + 4u * ty + 3u, n0 + tx, acc3);
}

fn store(t: u32, n: u32, v: vec4<f32>) {
    if t >= step.lm_t {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let c = n + 16u * j;
        if c < p.c {
            let at = (step.lm_t0 + t) * p.c + c;
            if p.accumulate == 1u {
                dx[at] += v[j];
            } else {
                dx[at] = v[j];
            }
        }
    }
}
