/// Logits: `logits[t, v] = sum_c x[t, c] * W[v, c]` with W given as f32 rows (the caller converts f16/bf16
/// storage, so the CPU sees the same values as the GPU).
/// logits: [T, V]; x: [T, C]; w: [V, C].
pub fn lm_head(logits: &mut [f32], x: &[f32], w: &[f32], t: usize, c: usize, v: usize) {
    for ti in 0..t {
        let xr = &x[ti * c..(ti + 1) * c];
        for r in 0..v {
            let wr = &w[r * c..(r + 1) * c];
            logits[ti * v + r] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
        }
    }
}

/// Backward of `lm_head` with respect to its input (the head is frozen): `dx = dlogits . W`.
/// dx: [T, C] (assigned); dlogits: [T, V]; w: [V, C].
pub fn lm_head_backward(dx: &mut [f32], dlogits: &[f32], w: &[f32], t: usize, c: usize, v: usize) {
    for ti in 0..t {
        let d = &mut dx[ti * c..(ti + 1) * c];
        d.fill(0.0);
        for r in 0..v {
            let g = dlogits[ti * v + r];
            if g != 0.0 {
                for (dc, wc) in d.iter_mut().zip(&w[r * c..(r + 1) * c]) {
                    *dc += g * wc;
                }
            }
        }
    }
}
