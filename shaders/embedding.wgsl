// Embedding gather for one row tile of the table: x[t] = E[tokens[t]] for the tokens whose row lies in
// [row0, row0 + rows). Large vocabularies are split into tiles that each fit a storage binding; every tile
// is dispatched and copies only its own rows.
//
// The table is stored as u32 words: two f16 values per word (unpack2x16float, which needs no shader-f16
// extension) when F16, else one f32 bit pattern per word.

override F16: bool = true;

struct Params {
    c: u32,     // C, hidden size
    row0: u32,  // first vocabulary row held by this tile
    rows: u32,  // rows in this tile
    _pad: u32,
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> tokens: array<u32>;    // [T]
@group(0) @binding(3) var<storage, read> table: array<u32>;     // [rows, C] as f16 pairs or f32
@group(0) @binding(4) var<storage, read_write> x: array<f32>;   // [T, C]
@group(0) @binding(5) var<storage, read> sampled: array<u32>;   // [rows], written by sample.wgsl

@compute @workgroup_size(256)
fn embedding(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = wg.x;
    if t >= step.t {
        return;
    }
    // Reading the sampled token on the device lets the host queue step n+1 before it has read step n's
    // token back, so encoding and GPU work overlap during decode. Row t of a batch step reads the token the
    // sampler picked for row t of the step before (the same sequence: rows keep their order while fed back).
    let tok = select(tokens[t], sampled[t], step.feedback == 1u);
    if tok < p.row0 || tok >= p.row0 + p.rows {
        return;
    }
    let r = tok - p.row0;
    for (var c = lid.x; c < p.c; c += 256u) {
        var v: f32;
        if F16 {
            let i = r * p.c + c;
            let pair = unpack2x16float(table[i / 2u]);
            v = select(pair.x, pair.y, (i & 1u) == 1u);
        } else {
            v = bitcast<f32>(table[r * p.c + c]);
        }
        x[t * p.c + c] = v;
    }
}
