use super::act_quant;

/// `out = w * (x / sqrt(mean(x^2) + eps))`, per token, in f32 (the multiply order of transformers'
/// BitNetRMSNorm: normalise first, then scale by the weight).
/// out: [T, C]; x: [T, C]; w: [C].
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32, t: usize, c: usize) {
    for i in 0..t {
        let row = &x[i * c..(i + 1) * c];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for j in 0..c {
            out[i * c + j] = w[j] * (row[j] * r);
        }
    }
}

/// RMSNorm followed by the activation quantizer of the projection that consumes it: the fused kernel
/// `rmsnorm_quant.wgsl` does both in one pass, and this twin composes the two reference ops.
/// q: [T, C] int8; s: [T]; x: [T, C]; w: [C].
pub fn rmsnorm_quant(q: &mut [i8], s: &mut [f32], x: &[f32], w: &[f32], eps: f32, t: usize, c: usize) {
    let mut y = vec![0f32; t * c];
    rmsnorm(&mut y, x, w, eps, t, c);
    act_quant(q, s, &y, t, c);
}

/// Backward of `rmsnorm` with respect to its input (the norm weights are frozen under LoRA and get no
/// gradient). With `r = 1/sqrt(mean(x^2) + eps)` and `g = w * dy`:
/// `dx = r * g - x * r^3 * sum(g * x) / C`.
/// dx: [T, C] (assigned); dy: [T, C]; x: [T, C]; w: [C].
pub fn rmsnorm_backward(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], eps: f32, t: usize, c: usize) {
    for i in 0..t {
        let row = &x[i * c..(i + 1) * c];
        let g = &dy[i * c..(i + 1) * c];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let r = 1.0 / (ms + eps).sqrt();
        let dot: f32 = (0..c).map(|j| w[j] * g[j] * row[j]).sum();
        let k = r * r * r * dot / c as f32;
        for j in 0..c {
            dx[i * c + j] = r * w[j] * g[j] - row[j] * k;
        }
    }
}
