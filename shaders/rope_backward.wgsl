// Backward of the rotary embedding, in place: the rotation is orthogonal, so the gradient turns back by
// the same angle: dx1 = dy1*cos + dy2*sin, dx2 = dy2*cos - dy1*sin (rotate-half convention; the position
// of token t is row_pos(t): step.start + t, or its place in its sequence of a training micro-batch).
// Grid (T, NH). CPU twin: cpu::rope_backward.

struct Params {
    nh: u32,     // heads to rotate
    hd: u32,     // head_dim
    stride: u32, // columns per token of dx (NH*HD when dx holds only these heads)
    off: u32,    // first column of these heads
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;        // [P, HD/2]
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;        // [P, HD/2]
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;     // [T, stride], heads at off.., dy on entry

@compute @workgroup_size(64)
fn rope_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = wg.x;
    let h = wg.y;
    if t >= step.t || h >= p.nh {
        return;
    }
    let half = p.hd / 2u;
    let pos = row_pos(t);
    let base = t * p.stride + p.off + h * p.hd;
    for (var i = lid.x; i < half; i += 64u) {
        let c = cos_t[pos * half + i];
        let s = sin_t[pos * half + i];
        let d1 = dx[base + i];
        let d2 = dx[base + half + i];
        dx[base + i] = d1 * c + d2 * s;
        dx[base + half + i] = d2 * c - d1 * s;
    }
}
