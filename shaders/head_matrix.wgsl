// Prepended (shaders/src/lib.rs) to lm_head.wgsl and lm_head_backward.wgsl: reads of one row tile of the
// head matrix, bound as `wt` ([rows, C] f16 pairs or f32 bits, by the kernel's F16), with the kernel's
// `p.c` (C) and `p.rows` (rows in the tile).

// W[r, c..c+4] (c a multiple of 4), zero past the tile or the row.
fn head_row4(r: u32, c: u32) -> vec4<f32> {
    if r >= p.rows {
        return vec4<f32>(0.0);
    }
    let i = r * p.c + c;
    if F16 && i % 2u == 0u && c + 3u < p.c {
        return vec4<f32>(unpack2x16float(wt[i / 2u]), unpack2x16float(wt[i / 2u + 1u]));
    }
    if !F16 && c + 3u < p.c {
        return bitcast<vec4<f32>>(vec4<u32>(wt[i], wt[i + 1u], wt[i + 2u], wt[i + 3u]));
    }
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if c + j < p.c {
            v[j] = head_at(i + j);
        }
    }
    return v;
}

// Element i of the tile.
fn head_at(i: u32) -> f32 {
    if F16 {
        return unpack2x16float(wt[i / 2u])[i % 2u];
    }
    return bitcast<f32>(wt[i]);
}
