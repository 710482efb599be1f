// Rotary embedding ("rotate half") on the fused q|k|v rows of a chunk, then the chunk's k and v are written
// into this layer's KV cache at their positions. cos/sin come from a table computed on the host, because
// Vulkan's cos/sin are only accurate near [-pi, pi] and positions reach thousands of radians.
// Workgroup (t, head): heads 0..NH rotate q in place; heads NH..NH+NKV rotate k and copy k and v.
// The cache holds `slot`s of NKV x P positions (continuous batching): `rope` writes the chunk's sequence at
// step.slot (in a training micro-batch, each sequence at its own slot: `row_slot`); `rope_rows` takes
// each row's own (slot, position) from `rows` (a decode step of a batch).

struct Params {
    nh: u32,
    nkv: u32,
    hd: u32,
    stride: u32,   // row length of qkv = (NH + 2 NKV) * HD
    cap: u32,      // positions the cache holds
    _a: u32,
    _b: u32,
    _c: u32,
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;        // [P, HD/2]
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;        // [P, HD/2]
@group(0) @binding(4) var<storage, read_write> qkv: array<f32>;    // [T, stride]
@group(0) @binding(5) var<storage, read_write> kc: array<f32>;     // [NKV, P, HD]
@group(0) @binding(6) var<storage, read_write> vc: array<f32>;     // [NKV, P, HD]
@group(0) @binding(7) var<storage, read> rows: array<vec2<u32>>;   // [T] (slot, position): rope_rows only

@compute @workgroup_size(64)
fn rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = wg.x;
    if t >= step.t {
        return;
    }
    rope_row(t, wg.y, row_slot(t), row_pos(t), lid.x);
}

@compute @workgroup_size(64)
fn rope_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = wg.x;
    if t >= step.t {
        return;
    }
    rope_row(t, wg.y, rows[t].x, rows[t].y, lid.x);
}

// Head `h` of chunk row `t`, at position `pos` of cache slot `slot`.
fn rope_row(t: u32, h: u32, slot: u32, pos: u32, lid: u32) {
    let half = p.hd / 2u;
    var base: u32;
    if h < p.nh {
        base = t * p.stride + h * p.hd;
    } else {
        base = t * p.stride + p.nh * p.hd + (h - p.nh) * p.hd;
    }
    for (var i = lid; i < half; i += 64u) {
        let c = cos_t[pos * half + i];
        let sn = sin_t[pos * half + i];
        let x1 = qkv[base + i];
        let x2 = qkv[base + half + i];
        let y1 = x1 * c - x2 * sn;
        let y2 = x2 * c + x1 * sn;
        if h < p.nh {
            qkv[base + i] = y1;
            qkv[base + half + i] = y2;
        } else {
            let kh = h - p.nh;
            let dst = ((slot * p.nkv + kh) * p.cap + pos) * p.hd;
            kc[dst + i] = y1;
            kc[dst + half + i] = y2;
            let vb = base + p.nkv * p.hd;
            vc[dst + i] = qkv[vb + i];
            vc[dst + half + i] = qkv[vb + half + i];
        }
    }
}
