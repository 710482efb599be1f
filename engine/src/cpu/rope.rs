/// cos/sin tables [P, HD/2] for positions 0..P, computed as transformers does in f32:
/// `inv_freq[i] = 1 / theta^(2i/HD)`, `angle = pos * inv_freq[i]`. The cos/sin of the f32 angle are taken in
/// f64 and rounded once, so the GPU reads a table instead of evaluating cos on large arguments, where
/// Vulkan allows very loose precision.
pub fn rope_table(theta: f64, head_dim: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = vec![0f32; positions * half];
    let mut sin = vec![0f32; positions * half];
    for p in 0..positions {
        for i in 0..half {
            let a = (p as f32 * inv[i]) as f64;
            cos[p * half + i] = a.cos() as f32;
            sin[p * half + i] = a.sin() as f32;
        }
    }
    (cos, sin)
}

/// Rotary embedding, "rotate half" convention, in place: for each head, with x1 = x[..HD/2], x2 = x[HD/2..],
/// `x1' = x1*cos - x2*sin`, `x2' = x2*cos + x1*sin`.
/// x: [T, NH, HD]; positions: [T]; cos/sin: [P, HD/2].
pub fn rope(x: &mut [f32], positions: &[usize], cos: &[f32], sin: &[f32], nh: usize, hd: usize) {
    rotate_half(x, positions, cos, sin, nh, hd, 1.0);
}

/// Backward of `rope`, in place: the rotation is orthogonal, so the gradient rotates by the inverse angle:
/// `dx1 = dy1*cos + dy2*sin`, `dx2 = dy2*cos - dy1*sin`.
/// dx: [T, NH, HD] holding dy on entry; positions: [T]; cos/sin: [P, HD/2].
pub fn rope_backward(dx: &mut [f32], positions: &[usize], cos: &[f32], sin: &[f32], nh: usize, hd: usize) {
    rotate_half(dx, positions, cos, sin, nh, hd, -1.0);
}

/// The rotation both share; `dir` = -1 turns by the opposite angle (negating sin is exact).
fn rotate_half(x: &mut [f32], positions: &[usize], cos: &[f32], sin: &[f32], nh: usize, hd: usize, dir: f32) {
    let half = hd / 2;
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..nh {
            let base = (t * nh + h) * hd;
            for i in 0..half {
                let (c, s) = (cos[p * half + i], dir * sin[p * half + i]);
                let x1 = x[base + i];
                let x2 = x[base + half + i];
                x[base + i] = x1 * c - x2 * s;
                x[base + half + i] = x2 * c + x1 * s;
            }
        }
    }
}

/// `rope` for a batch step, and the cache write that follows it (the twin of `rope_rows` in rope.wgsl, which
/// does both): row t of q [T, NH, HD] and k [T, NKV, HD] is rotated at its own position, then its k and v
/// [T, NKV, HD] are stored at (slot, position) of the caches [slots, NKV, P, HD]. `rows[t]` = (slot, pos).
#[allow(clippy::too_many_arguments)]
pub fn rope_rows(
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    rows: &[(usize, usize)],
    cos: &[f32],
    sin: &[f32],
    nh: usize,
    nkv: usize,
    hd: usize,
    p: usize,
) {
    let positions: Vec<usize> = rows.iter().map(|r| r.1).collect();
    rope(q, &positions, cos, sin, nh, hd);
    rope(k, &positions, cos, sin, nkv, hd);
    for (t, &(slot, pos)) in rows.iter().enumerate() {
        for h in 0..nkv {
            let dst = ((slot * nkv + h) * p + pos) * hd;
            let src = (t * nkv + h) * hd;
            k_cache[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
            v_cache[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
        }
    }
}
